"""Hugging Face transformers as the TTFT peer, on the very weights of Strata's engine.

``hf_model(loaded)`` builds ``LlamaForCausalLM`` (SDPA attention) on the meta device and assigns
it the engine's own parameter tensors (the names are Hugging Face's), so both run the same
weights without a second copy in memory. ``hf_ttft`` times one prefill the way TECH-NOTES
describes: ``model(ids, use_cache=True, logits_to_keep=1)`` (without ``logits_to_keep`` a 128K
prompt would materialise 128K x vocab logits), first token = argmax of the last position.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def hf_model(loaded: Any) -> Any:  # engine.loader.LoadedModel -> LlamaForCausalLM
    import transformers as tf

    mc = loaded.config
    if mc.arch != "llama":
        raise ValueError(f"the transformers peer is built for Llama shapes, not {mc.arch!r}")
    cfg = tf.LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta,
        rope_scaling=mc.rope_scaling_dict,
        tie_word_embeddings=mc.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    state = loaded.model.state_dict()  # the engine's tensors, shared (assign=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if [k for k in missing if k != "lm_head.weight" or not mc.tie_word_embeddings] or unexpected:
        raise ValueError(f"weights do not map onto transformers: {missing[:3]} {unexpected[:3]}")
    if mc.tie_word_embeddings:
        model.tie_weights()
    rotary = model.model.rotary_emb  # its buffers are still on meta: build it on the device
    with torch.device(loaded.device):  # (the constructor's device argument varies by version)
        model.model.rotary_emb = type(rotary)(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"transformers model still has tensors on meta: {left[:3]}")
    return model.eval()


@torch.inference_mode()
def hf_ttft(model: Any, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """Seconds from the call to the first token (argmax of the last position), and the token."""
    ids = torch.tensor([prompt], dtype=torch.int64, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())  # a host sync: the prefill has finished
    seconds = time.perf_counter() - start
    del out
    return seconds, token
