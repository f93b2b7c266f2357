"""Errors a user of the command line causes or meets, each printed as one line.

``UsageError``: what was asked cannot be done as given (bad path, busy port, out-of-range value,
nothing to connect to): exit 2. ``ServiceRunningError``: a Strata service already runs where
`strata up` would start one: exit 1. ``ClusterError``: the cluster cannot do it (missing
resources, a worker that would not start): exit 1. ``strata --debug`` shows the traceback.
"""

from __future__ import annotations

from proto.errors import StrataError


class CliError(StrataError):
    exit_code = 1


class UsageError(CliError):
    exit_code = 2


class ServiceRunningError(CliError):
    exit_code = 1


class ClusterError(CliError):
    exit_code = 1
