"""The block table's probe: keys far from their home slot and keys wrapping around the end of
the table are found, in batches of a few keys and of many."""

from __future__ import annotations

import random

from router.block_table import EMPTY_ROW, BlockTable


def test_probes_find_keys_pushed_far_from_home_and_around_the_end() -> None:
    table = BlockTable()
    cap = table.capacity
    shift = 64 - (cap.bit_length() - 1)
    rng = random.Random(0)

    def key(home: int) -> bytes:  # a hash whose home slot is ``home``
        return ((home << shift) | rng.getrandbits(shift)).to_bytes(8, "little") + rng.randbytes(8)

    near_end = [key(cap - 2) for _ in range(20)]  # their run wraps around to slot 0
    crowd = [key(100) for _ in range(40)]  # one home: a run past several probe windows
    for batch in (near_end[:5], crowd, near_end[5:]):  # few keys (4-slot first round), many
        table.find(batch, insert=True)
    keys = near_end + crowd
    ids = table.find(keys)
    assert (ids >= 0).all() and len(set(ids.tolist())) == len(keys)
    assert (ids[:20] < cap - 2).any()  # wrapped around
    assert table.find(keys + keys[:3]).tolist() == ids.tolist() + ids[:3].tolist()
    assert table.find(keys[::7]).tolist() == ids[::7].tolist()
    assert (table.rows(keys) == EMPTY_ROW).all()
    table.row_of[ids[30]] = 5
    assert table.rows(keys[25:35]).tolist() == [EMPTY_ROW] * 5 + [5] + [EMPTY_ROW] * 4
    absent = [key(100) for _ in range(3)] + [key(cap - 2) for _ in range(40)]
    assert (table.find(absent) == -1).all() and (table.find(absent[:3]) == -1).all()
    assert (table.rows(absent) == EMPTY_ROW).all()
