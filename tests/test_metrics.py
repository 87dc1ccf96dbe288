"""Metrics file round trip, TensorBoard events, the FLOPs count by hand, and the progress line."""

import json
import math
import struct
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from stm_jax.trainer import flops
from stm_jax.trainer.metrics import MetricsWriter, format_duration, format_progress, read_metrics


def strict_json(line: str) -> dict:
    """json.loads that rejects the NaN/Infinity extensions Python's json writes by default."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Reads the TFRecord-framed event files by hand (length, crc, event, crc)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_round_trip_with_non_finite_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "ce": np.float64(2.25), "tokens": np.int64(64),
                         "nan": float("nan"), "inf": jnp.inf, "ninf": -np.inf, "note": "ok"})
        writer.write(2, {"bpc": 3.0}, prefix="eval")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == [1, 2]
    assert '"nan": "nan"' in lines[0] and '"ninf": "-inf"' in lines[0]
    first, second = read_metrics(tmp_path)
    assert first["split"] == "train" and first["loss"] == 2.5 and first["tokens"] == 64
    assert math.isnan(first["nan"]) and first["inf"] == math.inf and first["ninf"] == -math.inf
    assert first["note"] == "ok"
    assert second == {"step": 2, "split": "eval", "bpc": 3.0}
    assert read_metrics(tmp_path, split="eval") == [second]


def test_resumed_run_appends_and_replayed_steps_are_merged(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.9})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 3, "split": "tr')  # killed mid-line
    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # resumed from step 1
        writer.write(2, {"loss": 2.8})
        writer.write(2, {"lr": 0.1})
        writer.write(3, {"loss": 2.7})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 4, "split": "tr')  # killed mid-line again
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.0), (2, 2.8), (3, 2.7)]
    assert records[1]["lr"] == 0.1


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(5, {"loss": jnp.float32(1.5), "ce": jnp.bfloat16(1.25), "note": "skipped",
                         "vector": np.ones(3)})
        writer.write(6, {"bpc": 2.0}, prefix="eval")
        # A step that skipped the lazy barrier has no barrier: a gap in its curve.
        writer.write(7, {"loss": 1.25, "barrier_weight": 0.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"train/loss": [(5, 1.5), (7, 1.25)], "train/ce": [(5, 1.25)],
                       "eval/bpc": [(6, 2.0)], "train/barrier_weight": [(7, 0.0)]}


def hand_counted_flops_per_token(layers, d, heads, tokens, vocab, mlp_ratio):
    """Forward FLOPs of one sequence, matmul by matmul as (rows, inner, cols), over tokens, x3."""
    head_dim = d // heads
    per_layer = [
        (tokens, d, d),  # q projection
        (tokens, d, d),  # k projection
        (tokens, d, d),  # v projection
        *[(tokens, head_dim, tokens)] * heads,  # scores q k^T, one per head, full square
        *[(tokens, tokens, head_dim)] * heads,  # probabilities @ v, one per head
        (tokens, d, d),  # output projection
        (tokens, d, mlp_ratio * d),  # MLP up
        (tokens, mlp_ratio * d, d),  # MLP down
    ]
    matmuls = per_layer * layers + [(tokens, d, vocab)]  # LM head
    forward = sum(2 * rows * inner * cols for rows, inner, cols in matmuls)
    return 3 * forward / tokens


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_matches_a_hand_count(tied):
    shape = dict(layers=2, d=8, heads=2, tokens=4, vocab=11, mlp_ratio=4)
    expected = hand_counted_flops_per_token(**shape)
    got = flops.model_flops_per_token(SimpleNamespace(
        num_layers=2, d_model=8, num_heads=2, context=4, vocab_size=11, mlp_ratio=4,
        tie_embeddings=tied))
    assert got == expected
    # The closed form: 6 N + 12 L T d with N = 12 L d^2 + d V.
    assert got == 6 * (12 * 2 * 8**2 + 8 * 11) + 12 * 2 * 4 * 8


def test_measured_matmul_flops_is_positive():
    assert 0 < flops.measure_matmul_flops(n=128, repeats=3) < 1e16


@pytest.mark.parametrize("kind,value", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v3", 123e12),
])
def test_peak_flops_from_the_spec_table(kind, value):
    peak, source = flops.peak_flops(SimpleNamespace(device_kind=kind))
    assert peak == value and kind in source


def test_peak_flops_measures_an_unknown_device(monkeypatch):
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda: 1.25e11)
    assert flops.peak_flops(SimpleNamespace(device_kind="cpu")) == (
        1.25e11, "measured float32 matmul on cpu")


def test_format_progress():
    line = format_progress(
        120, 2000, {"loss": jnp.float32(2.1341), "ce": 2.1009, "barrier": 1.65, "bpc": 3.0311,
                    "other": 1.0}, tokens_per_s=18_234.0, mfu=0.2134, elapsed_s=24.0)
    assert line == ("step 120/2000 | loss 2.134 ce 2.101 barrier 1.65 | bpc 3.031 | "
                    "18.2k tok/s | mfu 21.3% | eta 6m16s")
    assert format_progress(5, 10, {"ce": float("nan")}, None, None, None) == "step 5/10 | ce nan"
    assert format_progress(0, 10, {}, 950.0, None, 0.0) == "step 0/10 | 950 tok/s"
    # A lazy-barrier step without the barrier (weight 0) shows none; a NaN barrier shows.
    skipped = {"loss": 2.0, "ce": 2.0, "barrier_weight": 0.0}
    assert format_progress(3, 10, skipped, None, None, None) == "step 3/10 | loss 2 ce 2"
    evaluated = {**skipped, "barrier": float("nan"), "barrier_weight": 8.0}
    assert format_progress(3, 10, evaluated, None, None, None).endswith("barrier nan")
    # Resumed at step 100: 20 steps in 10 s, 1880 to go.
    assert format_progress(120, 2000, {}, 2.5e6, 0.5, 10.0, start_step=100).endswith(
        "2.5M tok/s | mfu 50.0% | eta 15m40s")


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 192, 3600 * 2 + 300, 86400 * 3 + 3600 * 4)] == [
        "0s", "59s", "3m12s", "2h05m", "3d04h"]
    assert format_duration(float("inf")) == "?" and format_duration(-1) == "?"
