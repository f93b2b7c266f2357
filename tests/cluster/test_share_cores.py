"""How a node's cores are shared among the service's workers (torch threads per worker)."""

from __future__ import annotations

from cluster.workers import share_cores


def test_one_node_without_role_resources_splits_its_cores() -> None:
    node = {"CPU": 16.0}
    assert share_cores([node], "decode", num_workers=2, local=16) == 8
    assert share_cores([node], "prefill", num_workers=4, local=16) == 4
    assert share_cores([{"CPU": 2.0}], "decode", num_workers=2, local=2) == 1
    assert share_cores([{"CPU": 2.0}], "decode", num_workers=5, local=2) == 1  # never 0


def test_workers_spread_over_nodes_without_role_resources() -> None:
    nodes = [{"CPU": 8.0}, {"CPU": 8.0}]
    assert share_cores(nodes, "prefill", num_workers=4, local=8) == 4  # 2 a node


def test_role_nodes_share_among_their_units() -> None:
    nodes = [
        {"CPU": 2.0},  # the head: no role resources, hosts no worker
        {"CPU": 16.0, "prefill": 2.0},
        {"CPU": 16.0, "decode": 1.0, "prefill": 1.0},
        {"CPU": 8.0, "decode": 1.0},
    ]
    assert share_cores(nodes, "prefill", num_workers=5, local=4) == 8  # min(16/2, 16/2)
    assert share_cores(nodes, "decode", num_workers=5, local=4) == 8  # min(16/2, 8/1)
