"""FLOP accounting: the model's FLOPs per token, the barrier's, and the peak they are divided by.

Model FLOPs utilisation (MFU) counts the model's FLOPs only, against a known accelerator's
spec-sheet peak or, on anything else, a matmul rate measured on this machine.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import numpy as np


def model_flops_per_token(model_cfg) -> float:
    """Training FLOPs per token of the GPT of ``model_cfg``: forward + backward = 3 x forward.

    Forward, per token, 2 FLOPs per multiply-add:
      * weights, ``2 N`` with N the matmul parameters: per layer the q, k, v, o projections
        (``4 d^2``) and the MLP (``2 mlp_ratio d^2``), plus the LM head (``d V``);
      * attention, exactly the score matmul ``q k^T`` (``2 T d``) and the value matmul
        ``p v`` (``2 T d``) per layer, over the full ``T x T`` square that a dense causal
        implementation computes before masking (the PaLM convention).
    Hence ``6 N + 12 L T d`` (nanoGPT's ``estimate_mfu``, PaLM appendix B). Not counted: the
    embedding lookup (no matmul), biases, norms, softmax and nonlinearities, and any extra work
    of the training objective. Heads and tied embeddings do not change the count (the head
    matmul costs ``2 d V`` whichever matrix it uses).
    """
    layers, d = model_cfg.num_layers, model_cfg.d_model
    matmul_params = layers * (4 + 2 * model_cfg.mlp_ratio) * d**2 + d * model_cfg.vocab_size
    attention = 2 * (2 * model_cfg.context * d) * layers
    return float(3 * (2 * matmul_params + attention))


def barrier_forward_flops(model_cfg, batch: int, scope: str, fraction: float = 1.0) -> float:
    """FLOPs of the barrier's forward pass over all layers, counted from the shapes.

    Per layer, sequence and head: the key projection through P_Q (2 T p^2), the outer products
    (T p^2) and their attention-weighted sum (2 n T p^2, the dominant matmul), the rank-one
    terms (4 n p^2), and an LU determinant (2/3 p^3 per token); n = positions evaluated. The
    "layer" scope forms (Hp x Hp) blocks: H times the matmul work, and (2/3)(Hp)^3 per token.
    """
    heads, context = model_cfg.num_heads, model_cfg.context
    head_dim = model_cfg.d_model // heads
    rows = max(1, round(fraction * context))
    width = head_dim * (heads if scope == "layer" else 1)  # columns of each block row
    per_head = (2 * context * head_dim * width + context * head_dim * width
                + 2 * rows * context * head_dim * width + 4 * rows * head_dim * width)
    det_size = head_dim * heads if scope == "layer" else head_dim
    dets = (2 / 3) * det_size**3 * rows * (1 if scope == "layer" else heads)
    return float(model_cfg.num_layers * batch * (heads * per_head + dets))


@functools.cache
def measure_matmul_flops(n: int = 2048, dtype: Any = np.float32, repeats: int = 5) -> float:
    """FLOP/s of one ``n x n`` matmul on the default device: median of ``repeats`` timed runs.

    On a CPU there is no spec sheet to trust, so MFU is reported against what this machine's
    matmul actually reaches; the median shrugs off one slow run. Measured once per process:
    every training run in a process shares the figure.
    """
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


# Dense bf16 peak FLOP/s per device (one GPU or one TPU chip), from vendor spec sheets.
# Matched as lower-case substrings of ``device.device_kind``, first match wins.
_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v2", 45e12),
    ("tpu v3", 123e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
)


def peak_flops(device: Any = None, given: float = 0.0) -> tuple[float, str]:
    """``(peak FLOP/s, where the figure comes from)`` for ``device`` (default: the first one).

    ``given`` > 0 (``config.peak_flops``) is used as it is. Otherwise known accelerators get
    their spec-sheet bf16 dense figure, and anything else (CPUs in particular) a measured
    float32 matmul rate, so MFU is always defined.
    """
    import jax

    if given > 0:
        return given, "config.peak_flops"
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, value in _PEAK_FLOPS:
        if name in kind:
            return value, f"spec sheet bf16 dense for {device.device_kind}"
    return measure_matmul_flops(), f"measured float32 matmul on {device.device_kind or device}"
