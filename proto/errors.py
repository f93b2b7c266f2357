"""``StrataError``: the root of every I/O, transfer and remote failure Strata raises.

Each package derives its own failures from it (``kvstore.errors``, ``kvtransfer.errors``,
``router.errors``, ``cluster.errors``), and the router's servicer maps each to one gRPC status.
It lives here, in the package every other one may import (the contracts between processes),
so no package reaches sideways or up for it. Bad configuration or user input raises
``ValueError``; a broken invariant is an ``assert``.
"""

from __future__ import annotations


class StrataError(Exception):
    """Root of every I/O, transfer and remote failure raised by Strata."""
