"""Separate test hosts on one machine (Linux namespaces on a bridge): the multi-host tests and
``strata bench soak --hosts N`` run the service on them the way it runs across machines."""
