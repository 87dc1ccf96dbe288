"""Training batches and evaluation windows over a split's token ids.

* `get_batch` draws random training windows as a pure function of (seed, step): a resumed run
  replays exactly the batches of an uninterrupted one.
* `eval_batches` walks a split in fixed, non-overlapping windows, so evaluation numbers are
  comparable between runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def check_split_length(tokens: np.ndarray, context: int, split_name: str) -> None:
    """Raises unless ``tokens`` holds one window of ``context`` inputs plus its next target."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    if len(tokens) < context + 1:
        raise ValueError(
            f"the {split_name} split has {len(tokens):,} tokens, fewer than context + 1 = "
            f"{context + 1:,}; use a shorter context or a longer text."
        )


def get_batch(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random training windows (inputs, targets), each int32 (batch_size, context).

    A pure function of (seed, step) -- no generator state to checkpoint -- so a resumed run
    replays the same batches. ``targets`` are ``inputs`` shifted by one token. ``tokens`` may
    be a memory map (``corpus.encode_to_file``): only the batch's windows are read.
    """
    seed, step = int(seed), int(step)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_split_length(tokens, context, "training")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context, size=batch_size)
    windows = np.asarray(tokens)[starts[:, None] + np.arange(context + 1)]  # (B, context + 1)
    inputs = np.ascontiguousarray(windows[:, :-1], dtype=np.int32)
    targets = np.ascontiguousarray(windows[:, 1:], dtype=np.int32)
    return inputs, targets


def num_eval_batches(
    num_tokens: int, *, batch_size: int, context: int, max_batches: int | None = None
) -> int:
    """How many batches `eval_batches` yields; raises if not even one full batch fits."""
    if batch_size < 1 or context < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    num_windows = max(num_tokens - 1, 0) // context
    num_batches = num_windows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"{num_tokens:,} tokens give {num_windows} windows of context {context}, fewer than "
            f"one batch of {batch_size}; use a smaller evaluation batch size or context."
        )
    return num_batches if max_batches is None else min(num_batches, max_batches)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, context: int, max_batches: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic evaluation batches (inputs, targets), each int32 (batch_size, context).

    Window k covers inputs ``tokens[k*context : (k+1)*context]`` and the targets one to the
    right; windows do not overlap and start at the beginning of the split. Only full batches
    are yielded: the tail after the last full batch (fewer than ``batch_size * context + 1``
    tokens) is dropped, as are batches beyond ``max_batches``. Compare evaluation numbers only
    at equal (batch_size, context, max_batches). Raises at call time if no full batch fits.
    """
    count = num_eval_batches(
        len(tokens), batch_size=batch_size, context=context, max_batches=max_batches
    )
    return _windows(tokens, count, batch_size * context, (batch_size, context))


def _windows(tokens, count: int, size: int, shape: tuple[int, int]):
    """Batch by batch, so a memory-mapped split is read one batch at a time."""
    for index in range(count):
        window = np.asarray(tokens[index * size:(index + 1) * size + 1], dtype=np.int32)
        yield window[:-1].reshape(shape), window[1:].reshape(shape)
