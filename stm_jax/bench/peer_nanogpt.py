"""nanoGPT's training step (PyTorch, eager), to time our CE-only step against in one run.

A faithful copy of nanoGPT's model and step at a given config: pre-LN blocks without biases,
fused QKV projection, ``scaled_dot_product_attention(is_causal=True)``, exact GELU, tied
embeddings, AdamW with weight decay on matrices only, gradient clipping at 1.0. Its weights
are random: only its speed is measured. PyTorch is not a dependency of stm_jax;
``scripts/benchmark.py --peer`` imports this module only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# OpenMP threads that spin after PyTorch's parallel regions would steal the cores from the
# JAX steps timed in between; passive waiting gives them back at once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("the nanoGPT peer benchmark needs PyTorch: pip install torch") from error


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.c_fc = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.mlp_proj = nn.Linear(mlp_ratio * d_model, d_model, bias=False)

    def forward(self, x):
        batch, tokens, width = x.shape
        heads = lambda t: t.view(batch, tokens, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(batch, tokens, width))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class _GPT(nn.Module):
    def __init__(self, model_cfg):
        super().__init__()
        d = model_cfg.d_model
        self.wte = nn.Embedding(model_cfg.vocab_size, d)
        self.wpe = nn.Embedding(model_cfg.context, d)
        self.blocks = nn.ModuleList([_Block(d, model_cfg.num_heads, model_cfg.mlp_ratio)
                                     for _ in range(model_cfg.num_layers)])
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, model_cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT

    def forward(self, inputs, targets):
        x = self.wte(inputs) + self.wpe(torch.arange(inputs.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_step(config, inputs, targets) -> Callable[[], float]:
    """A callable that runs one nanoGPT training step on the given (B, T) int batch."""
    torch.manual_seed(config.seed)
    model = _GPT(config.model)
    params = list(model.parameters())
    opt_cfg = config.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opt_cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=opt_cfg.learning_rate, betas=(opt_cfg.beta1, opt_cfg.beta2))
    inputs = torch.as_tensor(inputs, dtype=torch.long)
    targets = torch.as_tensor(targets, dtype=torch.long)

    def step() -> float:
        loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def describe() -> str:
    return f"PyTorch {torch.__version__}, eager, {torch.get_num_threads()} threads"
