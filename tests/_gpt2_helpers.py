"""A tiny random GPT-2 directory written with NumPy + safetensors, and a NumPy forward pass.

The reference forward pass follows GPT-2 as transformers writes it (``GPT2Block``): pre-LN
blocks, ``Conv1D`` weights stored (in, out), heads split from the last axis of ``c_attn``'s
output, tanh GELU, tied output embedding. It is the oracle ``load_gpt2`` is checked against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_hf_config(vocab_size: int, *, n_layer=2, n_head=2, n_embd=16, n_positions=24,
                   tie=True) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": vocab_size, "n_positions": n_positions, "n_embd": n_embd,
            "n_layer": n_layer, "n_head": n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": tie, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True}


def random_tensors(hf: dict, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    """Every GPT-2 tensor, random (biases and LayerNorm parameters included, so each matters)."""
    rng = np.random.default_rng(seed)
    d, inner, vocab = hf["n_embd"], hf["n_inner"] or 4 * hf["n_embd"], hf["vocab_size"]
    def normal(*shape, s=0.2):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"wte.weight": normal(vocab, d, s=0.5), "wpe.weight": normal(hf["n_positions"], d),
               "ln_f.weight": 1 + normal(d), "ln_f.bias": normal(d)}
    for i in range(hf["n_layer"]):
        h = f"h.{i}."
        tensors.update({
            h + "ln_1.weight": 1 + normal(d), h + "ln_1.bias": normal(d),
            h + "attn.c_attn.weight": normal(d, 3 * d, s=0.4),
            h + "attn.c_attn.bias": normal(3 * d),
            h + "attn.c_proj.weight": normal(d, d), h + "attn.c_proj.bias": normal(d),
            h + "ln_2.weight": 1 + normal(d), h + "ln_2.bias": normal(d),
            h + "mlp.c_fc.weight": normal(d, inner), h + "mlp.c_fc.bias": normal(inner),
            h + "mlp.c_proj.weight": normal(inner, d), h + "mlp.c_proj.bias": normal(d),
        })
    tensors = {prefix + name: value for name, value in tensors.items()}
    if not hf["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal(vocab, d, s=0.5)
    return tensors


def write_gpt2_dir(path: Path, hf: dict, seed: int = 0, prefix: str = "transformer.",
                   tokenizer_json: str | None = None) -> dict[str, np.ndarray]:
    """config.json + model.safetensors (+ tokenizer.json) in ``path``; returns the tensors."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(hf, seed, prefix)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return {name.removeprefix("transformer."): value for name, value in tensors.items()}


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(tensors: dict, hf: dict, tokens: np.ndarray) -> np.ndarray:
    """GPT-2's logits (T, V) for one sequence of token ids, in float64 NumPy."""
    t = {name: value.astype(np.float64) for name, value in tensors.items()}
    d, heads, eps = hf["n_embd"], hf["n_head"], hf["layer_norm_epsilon"]
    p, num = d // heads, len(tokens)
    x = t["wte.weight"][tokens] + t["wpe.weight"][:num]
    causal = np.tril(np.ones((num, num), bool))
    for i in range(hf["n_layer"]):
        h = f"h.{i}."
        a = _layer_norm(x, t[h + "ln_1.weight"], t[h + "ln_1.bias"], eps)
        qkv = a @ t[h + "attn.c_attn.weight"] + t[h + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(num, heads, p).transpose(1, 0, 2)
                   for j in range(3))
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(p), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        merged = (weights @ v).transpose(1, 0, 2).reshape(num, d)
        x = x + merged @ t[h + "attn.c_proj.weight"] + t[h + "attn.c_proj.bias"]
        m = _layer_norm(x, t[h + "ln_2.weight"], t[h + "ln_2.bias"], eps)
        hidden = _gelu_tanh(m @ t[h + "mlp.c_fc.weight"] + t[h + "mlp.c_fc.bias"])
        x = x + hidden @ t[h + "mlp.c_proj.weight"] + t[h + "mlp.c_proj.bias"]
    x = _layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps)
    head = t["wte.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T
