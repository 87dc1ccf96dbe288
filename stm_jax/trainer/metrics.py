"""Metrics on disk and the one-line progress report.

``workdir/metrics.jsonl`` is the record of a run: one JSON object per ``write``, readable by
tests, notebooks and plots without TensorBoard. TensorBoard event files (via tensorboardX, no
TensorFlow) are a convenience view of the same scalars. A run of several processes has one
record, written by process 0; the others get a ``NullWriter``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stm_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and, optionally, TensorBoard.

    The file is opened for appending, so a resumed run continues the same record; each line is
    flushed at once so a crash loses nothing already written. An object store (``gs://``)
    cannot append, so there the file is rewritten whole at each write.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.workdir = files.as_path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._file = self._remote_text = None
        if files.is_local(self.path):
            dangling = _ends_mid_line(Path(self.path))
            self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
            if dangling:
                self._file.write("\n")  # a killed run's half line stays a line of its own
        else:
            self._remote_text = self.path.read_text() if self.path.exists() else ""
            if self._remote_text and not self._remote_text.endswith("\n"):
                self._remote_text += "\n"
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
        record.update(files.to_json(dict(metrics)))
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._remote_text += line
            self.path.write_text(self._remote_text)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                scalar = _scalar_or_none(value)
                if scalar is not None:
                    self._tensorboard.add_scalar(f"{prefix}/{key}", scalar, int(step))

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class NullWriter:
    """The writer of processes other than 0: the run's one record is process 0's."""

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


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
    merged: dict[tuple[str, int], dict] = {}
    for record in files.read_jsonl(files.as_path(workdir) / METRICS_FILE):
        if split is None or record.get("split") == split:
            key = (record.get("split"), record.get("step"))
            merged[key] = {**merged.get(key, {}), **record}
    return list(merged.values())


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


_PROGRESS_GROUPS = (("loss", "ce", "barrier"), ("bpc", "bits_per_token"))


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

    Missing metrics and ``None`` arguments are left out (a lazy-barrier step without the
    barrier has no "barrier"). ``mfu`` is a fraction.
    The ETA assumes the remaining steps run at the pace of the ``step - start_step`` steps
    done in ``elapsed_s`` (pass the resumed step as ``start_step``).
    """
    parts = [f"step {step}/{num_steps}"]
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


def scalars(host: Mapping[str, Any]) -> dict:
    """A record's numbers: scalars as they are, arrays of up to 16 values as ``name_i``."""
    out = {}
    for name, value in host.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = value.item()
        elif value.size <= 16:
            out.update({f"{name}_{i}": v.item() for i, v in enumerate(value.ravel())})
    return out
