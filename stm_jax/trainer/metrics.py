"""Metrics on disk, a one-line progress report, and the FLOPs behind model FLOPs utilisation.

``workdir/metrics.jsonl`` is the record of a run: one JSON object per ``write``, readable by
tests, notebooks and plots without TensorBoard. TensorBoard event files (via tensorboardX, no
TensorFlow) are a convenience view of the same scalars.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_value(value: Any) -> Any:
    """A JSON-safe copy: numpy/jax scalars become Python numbers, NaN/Inf become strings.

    ``json.dumps`` would otherwise write bare ``NaN``, which strict JSON readers reject, and a
    NaN loss is exactly the line someone will want to read.
    """
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    array = np.asarray(value)  # pulls jax arrays to the host
    if array.ndim:
        return [_json_value(item) for item in array.tolist()]
    item = array.item()
    if isinstance(item, float) and not math.isfinite(item):
        return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
    return item


def _from_json(value: Any) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    return value


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and, optionally, TensorBoard.

    The file is opened for appending, so a resumed run continues the same record; each line is
    flushed at once so a crash loses nothing already written.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        dangling = _ends_mid_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if dangling:
            self._file.write("\n")  # a killed run's half line stays a line of its own
        self._tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # only needed when asked for

            self._tensorboard = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR))

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        """Writes ``{"step": step, "split": prefix, **metrics}`` as one line; scalars to TB as
        ``prefix/name``."""
        record = {"step": int(step), "split": prefix}
        record.update({str(key): _json_value(value) for key, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:  # a skipped lazy barrier is a gap, not a NaN point
            for key, value in without_skipped_barrier(metrics).items():
                scalar = _scalar_or_none(value)
                if scalar is not None:
                    self._tensorboard.add_scalar(f"{prefix}/{key}", scalar, int(step))

    def flush(self) -> None:
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as file:
        file.seek(-1, 2)
        return file.read(1) != b"\n"


def _scalar_or_none(value: Any) -> float | None:
    if isinstance(value, str) or value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        return None
    item = array.reshape(()).item()  # bfloat16 (dtype kind 'V') also comes out as a float
    return float(item) if isinstance(item, bool | int | float) else None


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in order, NaN/Inf strings turned back to floats.

    A resumed run replays the steps after its last checkpoint, so records sharing a
    ``(split, step)`` are merged, later values winning: one record per step, as the final run saw
    it. A line cut short by a killed process is skipped.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    merged: dict[tuple[str, int], dict] = {}
    for line in lines:
        try:
            record = _from_json(json.loads(line))
        except json.JSONDecodeError:  # empty, or the fragment a killed write left
            continue
        if split is None or record.get("split") == split:
            key = (record.get("split"), record.get("step"))
            merged[key] = {**merged.get(key, {}), **record}
    return list(merged.values())


def transformer_flops_per_token(
    num_layers: int,
    d_model: int,
    num_heads: int,
    context: int,
    vocab_size: int,
    mlp_ratio: int = 4,
    tied: bool = True,
) -> float:
    """Training FLOPs per token of a GPT block stack: forward + backward = 3 x forward.

    Forward, per token, 2 FLOPs per multiply-add:
      * weights, ``2 N`` with N the matmul parameters: per layer the q, k, v, o projections
        (``4 d^2``) and the MLP (``2 mlp_ratio d^2``), plus the LM head (``d V``);
      * attention, exactly the score matmul ``q k^T`` (``2 T d``) and the value matmul
        ``p v`` (``2 T d``) per layer, over the full ``T x T`` square that a dense causal
        implementation computes before masking (the PaLM convention).
    Hence ``6 N + 12 L T d`` (nanoGPT's ``estimate_mfu``, PaLM appendix B). Not counted: the
    embedding lookup (no matmul), biases, norms, softmax and nonlinearities, and any extra work
    of the training objective; MFU counts the model's FLOPs only. ``num_heads`` does not change
    the count (heads x head_dim = d); ``tied`` neither, as the head matmul costs ``2 d V``
    whichever matrix it uses. Both are accepted so a model config can be passed as is.
    """
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    del tied
    matmul_params = num_layers * (4 + 2 * mlp_ratio) * d_model**2 + d_model * vocab_size
    attention = 2 * (2 * context * d_model) * num_layers
    return float(3 * (2 * matmul_params + attention))


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """MFU as a fraction: model FLOPs actually achieved over the hardware's peak."""
    return tokens_per_s * flops_per_token / peak


@functools.cache
def measure_matmul_flops(n: int = 2048, dtype: Any = np.float32, repeats: int = 5) -> float:
    """FLOP/s of one ``n x n`` matmul on the default device: median of ``repeats`` timed runs.

    On a CPU there is no spec sheet to trust, so MFU is reported against what this machine's
    matmul actually reaches; the median shrugs off one slow run. Measured once per process
    (about 1.5 s on 2 cores): every training run in a process shares the figure.
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


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``3d04h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _format_count(value: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.0f}"


def without_skipped_barrier(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    """The metrics without "barrier" when the step skipped it (``barrier_evaluated`` 0)."""
    if _scalar_or_none(metrics.get("barrier_evaluated")) == 0.0:
        return {key: value for key, value in metrics.items() if key != "barrier"}
    return metrics


_PROGRESS_GROUPS = (("loss", "ce", "barrier"), ("bpc",))


def format_progress(
    step: int,
    num_steps: int,
    metrics: Mapping[str, Any],
    tokens_per_s: float | None,
    mfu: float | None,
    elapsed_s: float | None,
    *,
    start_step: int = 0,
) -> str:
    """``step 120/2000 | loss 2.134 ce 2.101 barrier 1.65 | bpc 3.031 | 18.2k tok/s | mfu 21.3% |
    eta 3m12s``.

    Missing metrics and ``None`` arguments are left out, and so is the barrier on a step
    that did not evaluate it (``objective.barrier_step_fraction`` < 1). ``mfu`` is a fraction.
    The ETA assumes the remaining steps run at the pace of the ``step - start_step`` steps
    done in ``elapsed_s`` (pass the resumed step as ``start_step``).
    """
    parts = [f"step {step}/{num_steps}"]
    metrics = without_skipped_barrier(metrics)
    for group in _PROGRESS_GROUPS:
        values = {key: _scalar_or_none(metrics.get(key)) for key in group}
        shown = [f"{key} {value:.4g}" for key, value in values.items() if value is not None]
        if shown:
            parts.append(" ".join(shown))
    if tokens_per_s is not None:
        parts.append(f"{_format_count(tokens_per_s)} tok/s")
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    done = step - start_step
    if elapsed_s is not None and done > 0:
        parts.append(f"eta {format_duration(elapsed_s / done * (num_steps - step))}")
    return " | ".join(parts)
