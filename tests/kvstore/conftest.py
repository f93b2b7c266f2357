"""Fixtures of the store tests: ``make_store`` closes every store and checks every pin is gone."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import pytest

# --import-mode=importlib does not put test folders on sys.path; the helpers module lives here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvstore_testutil import FP, LAYOUT

from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.store import TieredStore

MakeStore = Callable[..., TieredStore]


@pytest.fixture
def make_store(tmp_path) -> Iterator[MakeStore]:
    """``make_store(host_blocks=, disk=True|path|None, disk_capacity_bytes=, **config)``.

    After the test every pin is released and every store closed.
    """
    stores: list[TieredStore] = []

    def _make(
        host_blocks: int = 8,
        disk: bool | str | None = True,
        fingerprint: bytes = FP,
        layout: KVLayout = LAYOUT,
        store_kwargs: dict | None = None,
        **config: object,
    ) -> TieredStore:
        disk_path = str(tmp_path / "disk") if disk is True else (disk or None)
        cfg = StoreConfig(
            host_capacity_bytes=host_blocks * layout.block_nbytes,
            disk_path=disk_path,
            **config,  # type: ignore[arg-type]
        )
        store = TieredStore(layout, fingerprint, cfg, **(store_kwargs or {}))
        stores.append(store)
        return store

    yield _make
    try:
        for store in stores:
            if store.host is not None:
                assert store.host.num_pinned() == 0, "host ref counts not back to zero"
            if store.disk is not None:
                assert store.disk.num_pinned() == 0, "disk ref counts not back to zero"
            assert store.num_pinned() == 0
    finally:
        for store in stores:
            store.close()
