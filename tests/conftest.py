"""Shared fixtures: every engine made through ``make_engine`` is checked for leaked blocks."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def make_engine():
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    engines: list[LLMEngine] = []

    def _make(store_config=None, loaded=None, **kw):
        eng = LLMEngine(EngineConfig(**kw), store_config, loaded=loaded)
        engines.append(eng)
        return eng

    yield _make
    try:
        for eng in engines:
            eng.check_no_leaks()  # every block free again, every ref count zero
    finally:
        for eng in engines:
            eng.close()


@pytest.fixture(scope="session")
def smollm2_reference():
    """The oracle for the real model: Hugging Face transformers' own model loaded from the same
    GGUF file in float32, and greedy continuations from it, computed once per session (loading
    takes ~30 s on 2 cores) and shared by the engine and service tests."""
    from tests.smollm2_refs import Reference

    return Reference()
