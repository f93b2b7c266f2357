"""The logits gate of ``bench.ttft``: a warm run is timed only if its first token's logits
match the cold run's (``check_warm_logits``).

A warm run computes its last chunk in other GEMM shapes than the cold run (16 rows, not
2,048), so in bf16 its logits differ by rounding, and random weights leave near-ties that
this flips (3 of 5 first tokens on the 8B shape, H200). The gate therefore compares logits:
- the cold run's top-1 token is among the warm run's LOGIT_TOP_K best;
- max |warm - cold| <= LOGIT_RTOL[dtype] * max |cold| (the logits' own scale).
Measured for the bf16 tolerance (CPU, random weights): bf16 against float32 on the same
weights moves the largest logit by 0.7-0.9% of max |logit| on tiny (4 layers) and 3.0-3.2% on
the llama-3.2-1b shape (16 layers), an upper bound of what another chunk shape does; one wrong
KV block moves it by 40-67% (64-token prompt), 14-33% (128) and 7-14% (256) on tiny. A
single wrong block among thousands is below any rounding tolerance: deterministic mode
(``engine: {deterministic: true}``) makes warm runs bit-identical, and there the gate
demands equality.
"""

from __future__ import annotations

from typing import Any

LOGIT_TOP_K = 5
LOGIT_RTOL = {"torch.float32": 1e-3, "torch.bfloat16": 0.1, "torch.float16": 0.05}


def logit_gap(cold: Any, warm: Any) -> dict[str, Any]:  # [vocab] float tensors
    """How far the warm logits are from the cold ones."""
    diff = float((warm - cold).abs().max())
    return {"max_abs": diff, "rel": diff / max(float(cold.abs().max()), 1e-30),
            "same_token": int(cold.argmax()) == int(warm.argmax()),
            "cold_top1_rank": int((warm > warm[int(cold.argmax())]).sum())}


def check_warm_logits(cold: Any, warm: Any, dtype: str, exact: bool = False) -> str | None:
    """None if ``warm`` passes the gate against ``cold`` (logits ``[vocab]``), else why not."""
    gap = logit_gap(cold, warm)
    if exact:
        return None if bool((warm == cold).all()) else (
            f"logits differ by up to {gap['max_abs']:.3g} in deterministic mode (must be "
            "bit-identical)")
    if gap["cold_top1_rank"] >= LOGIT_TOP_K:
        return (f"the cold top-1 token ranks {gap['cold_top1_rank'] + 1} in the warm logits "
                f"(gate: top {LOGIT_TOP_K})")
    rtol = LOGIT_RTOL.get(dtype, 0.1)
    if gap["rel"] > rtol:
        return (f"logits differ by up to {gap['max_abs']:.3g} = {gap['rel']:.1%} of the largest "
                f"(gate: {rtol:.1%} in {dtype})")
    return None
