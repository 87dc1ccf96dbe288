"""The benchmark harness measures every mode and states every target (no timing asserts)."""

import pytest

from configs import tiny
from stm_jax import benchmark


def test_floor_counts_scale_with_the_shapes():
    config = tiny.get_config()
    head = benchmark.barrier_forward_flops(config.model, 8, "head")
    assert benchmark.barrier_forward_flops(config.model, 16, "head") == pytest.approx(2 * head)
    assert benchmark.barrier_forward_flops(config.model, 8, "head", fraction=0.25) < head / 2
    assert benchmark.barrier_forward_flops(config.model, 8, "layer") > head


def test_benchmark_rows_and_targets():
    config = tiny.get_config()
    config.model.vocab_size = 20
    config.batch_size = 2
    modes = {name: benchmark.MODES[name] for name in ("ce", "head", "head_estimator",
                                                        "head_lazy")}
    rows = benchmark.benchmark_config("tiny", config, modes, rounds=1, matmul_rate=1e11,
                                      log=lambda _: None)
    assert [r["mode"] for r in rows] == list(modes)
    assert all(r["step_ms"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert "overhead_vs_floor" in rows[1] and "overhead_vs_floor" not in rows[0]
    table, targets = benchmark.targets_table(rows, peer_tokens_per_s=19000)
    assert {t["target"] for t in targets} >= {
        "tiny: head barrier peak memory / CE", "tiny: estimator step time / CE",
        "tiny: estimator on 0.125 of steps, mean step time / CE"}
    # The lazy mode weighs a barrier step by 1/8 and a CE-only step by 7/8.
    lazy = rows[3]
    assert lazy["step_fraction"] == 0.125 and lazy["barrier_step_ms"] > 0
    assert lazy["step_ms"] < lazy["barrier_step_ms"]
    assert table.count("\n") == len(targets) + 1
    assert "| tiny | head |" in benchmark.format_table(rows)


def test_estimator_spread_on_a_fraction_of_steps_is_wider():
    config = tiny.get_config()
    config.model.vocab_size = 20
    config.batch_size = 2
    spread = benchmark.estimator_spread(config, 0.25, draws=4, step_fraction=0.25)
    assert spread["relative_std"] > 0
    # E[X^2]/q - E[X]^2 exceeds Var X for q < 1.
    assert spread["lazy_relative_std"] > spread["relative_std"]
