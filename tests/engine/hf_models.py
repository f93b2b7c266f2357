"""Small random Hugging Face checkpoints written with ``save_pretrained`` (the test oracle)."""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral", "llama_tied")


def hf_config(arch: str):
    import transformers as tf

    common = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.08,
        rms_norm_eps=1e-5,
    )
    if arch in ("llama", "llama_tied"):
        return tf.LlamaConfig(
            **common,
            rope_theta=50000.0,
            tie_word_embeddings=arch == "llama_tied",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, rope_theta=10000.0, sliding_window=48, head_dim=16)
    raise ValueError(arch)


def write_checkpoint(arch: str, path: str, max_shard_size: str | None = None):
    import transformers as tf

    torch.manual_seed(1234)
    cfg = hf_config(arch)
    cls = {
        "llama": tf.LlamaForCausalLM,
        "llama_tied": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mistral": tf.MistralForCausalLM,
    }[arch]
    model = cls(cfg).to(torch.float32).eval()
    if arch == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation with HF's own KV cache; also the prompt's last-position logits."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    first_logits = out.logits[0, -1].float()
    past = out.past_key_values
    tok = int(first_logits.argmax())
    result = [tok]
    for _ in range(n - 1):
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        result.append(tok)
    return result, first_logits
