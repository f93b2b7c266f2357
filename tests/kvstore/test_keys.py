"""Block keys: extend_hashes grows a sequence's hashes as blocks fill, without re-reading its
whole token list on every decode step."""

from __future__ import annotations

from kvstore.keys import extend_hashes, hash_prompt_blocks

FP = b"f" * 16


class _Tokens(list):
    """A token list that records the length of every slice taken from it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.sliced: list[int] = []

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.sliced.append(len(range(*key.indices(len(self)))))
        return super().__getitem__(key)


def test_extend_hashes_matches_and_reads_only_new_blocks() -> None:
    tokens = _Tokens()
    hashes: list = []
    for t in range(200):  # one token at a time, like decode steps
        tokens.append((t * 7) % 50)
        extend_hashes(hashes, tokens, 16, FP, "salt")
    assert hashes == hash_prompt_blocks(list(tokens), 16, FP, "salt")
    assert len(hashes) == 12 and tokens.sliced == [16] * 12  # one block's tokens per new block
    prompt = _Tokens(range(100))
    extend_hashes(hashes2 := [], prompt, 16, FP)
    assert prompt.sliced == [96] and hashes2 == hash_prompt_blocks(list(range(100)), 16, FP)
