"""The benchmark harness measures every mode and states every target (no timing asserts)."""

import time

import pytest

from configs import tiny
from stm_jax.bench import benchmark, report
from stm_jax.errors import UserError
from stm_jax.trainer import flops


def test_floor_counts_scale_with_the_shapes():
    config = tiny.get_config()
    head = flops.barrier_forward_flops(config.model, 8, "head")
    assert flops.barrier_forward_flops(config.model, 16, "head") == pytest.approx(2 * head)
    assert flops.barrier_forward_flops(config.model, 8, "head", fraction=0.25) < head / 2
    assert flops.barrier_forward_flops(config.model, 8, "layer") > head


class SleepingPeer:
    """A stand-in for ``peer_nanogpt`` (PyTorch is not a dependency): a step of known length."""

    calls = 0

    @classmethod
    def make_step(cls, config, inputs, targets):
        assert inputs.shape == (config.batch_size, config.model.context)

        def step():
            cls.calls += 1
            time.sleep(0.002)

        return step

    @staticmethod
    def describe():
        return "a sleeping stand-in"


def test_benchmark_rows_and_targets():
    config = tiny.get_config()
    config.model.vocab_size = 20
    config.batch_size = 2
    config.microbatches = 2
    modes = {name: benchmark.MODES[name] for name in ("ce", "head_lazy")}
    # The barrier on every other step: a timed pass of two steps keeps the test short.
    modes["head_lazy"] = {**modes["head_lazy"], "barrier_step_fraction": 0.5}
    rows = benchmark.benchmark_config("tiny", config, modes, rounds=1, matmul_rate=1e11,
                                      steps_per_round=2, peer=SleepingPeer, log=lambda _: None)
    assert [r["mode"] for r in rows] == [*modes, benchmark.PEER_MODE]
    # Ratios are paired per round: CE against itself is exactly 1.
    assert rows[0]["step_vs_ce"] == 1.0 and rows[0]["step_vs_ce_quartiles"] == [1.0, 1.0]
    low, high = rows[1]["step_vs_ce_quartiles"]
    assert low <= rows[1]["step_vs_ce"] <= high
    assert rows[1]["step_vs_ce_interval"] == [rows[1]["step_vs_ce_rounds"][0]] * 2  # one round
    assert all(r["step_ms"] > 0 and r["peak_memory_mb"] > 0 for r in rows[:-1])
    assert "overhead_vs_floor" in rows[1] and "overhead_vs_floor" not in rows[0]
    assert [r["microbatches"] for r in rows] == [2, 2, 1]
    one = benchmark._mode_config(config, benchmark.MODES["ce_one_microbatch"])
    assert one.microbatches == 1 and config.microbatches == 2
    # Two rounds (one warm-up), each timing the second of two peer steps.
    assert SleepingPeer.calls == 4 and rows[-1]["step_ms"] >= 2
    assert rows[-1]["peak_memory_mb"] is None
    targets = report.targets_table(rows, peer_tokens_per_s=19000)
    table = report.targets_markdown(targets)
    assert [t["target"] for t in targets] == [
        "tiny: estimator on 1/32 of positions and 1/2 of steps, mean step time / CE",
        "tiny: CE-only tokens/s vs nanoGPT (a sleeping stand-in), same run"]
    # The lazy mode is timed over one barrier step and one CE-only step; its floor is half the
    # estimator's (its positions, on every other step).
    lazy = rows[1]
    estimator_flops = flops.barrier_forward_flops(
        config.model, 2, "head", benchmark.MODES["head_lazy"]["barrier_fraction"])
    assert lazy["step_fraction"] == 0.5 and lazy["barrier_step_ms"] > 0
    assert lazy["floor_ms"] == pytest.approx(1e3 * 3 * estimator_flops / 1e11 / 2)
    assert table.count("\n") == len(targets) + 1
    assert "| tiny | head_lazy | 2 |" in report.format_table(rows)


def test_targets_compare_each_measurement_with_its_goal():
    """The targets table from given rows: the thresholds, and a target just missed or met."""
    rows = [
        {"config": "c", "mode": "ce", "tokens_per_s": 1000.0},
        {"config": "c", "mode": "head", "memory_vs_ce": 1.6, "overhead_vs_floor": 1.3},
        {"config": "c", "mode": "head_chunked", "memory_vs_ce": 1.5, "overhead_vs_floor": 2.0},
        {"config": "c", "mode": "head_estimator", "position_fraction": 0.25, "step_vs_ce": 1.29},
        {"config": "c", "mode": "head_lazy", "position_fraction": 0.25, "step_fraction": 0.125,
         "step_vs_ce": 1.31},
        {"config": "c", "mode": benchmark.PEER_MODE, "tokens_per_s": 1001.0,
         "description": "peer"},
        {"config": "c", "mode": "margin_hinge_estimator", "position_fraction": 0.25,
         "step_vs_ce": 1.2},
        {"config": "c", "mode": "prior_p8", "step_vs_ce": 1.12},
    ]
    targets = report.targets_table(rows, peer_tokens_per_s=19000)
    assert {t["target"]: t["met"] for t in targets} == {
        "c: head barrier peak memory / CE": False,
        "c: head barrier overhead / arithmetic floor": True,
        "c: head_chunked barrier peak memory / CE": True,
        "c: head_chunked barrier overhead / arithmetic floor": False,
        "c: estimator on 1/4 of positions, step time / CE": True,
        "c: estimator on 1/4 of positions and 1/8 of steps, mean step time / CE": False,
        "c: CE-only tokens/s vs nanoGPT (peer), same run": False,
        "c: margin_hinge estimator on 1/4 of positions, step time / CE": True,
        "c: embedding prior (prior_dim 8), step time / CE": False,
    }
    assert [report._fraction_text(f) for f in (1 / 32, 0.3, 1.0)] == ["1/32", "0.3", "all"]
    # Without a peer in the run, shakespeare_char:cpu's CE-only is held to the quoted rate.
    quoted = [{"config": "shakespeare_char:cpu", "mode": "ce", "tokens_per_s": 19500.0}]
    assert [t["met"] for t in report.targets_table(quoted, peer_tokens_per_s=19000)] == [True]


def test_nanogpt_peer_step_trains():
    """The PyTorch peer is a real model: its loss falls on a repeated batch."""
    pytest.importorskip("torch")
    import numpy as np

    from stm_jax.bench import peer_nanogpt

    config = tiny.get_config()
    config.model.vocab_size = 20
    batch = np.random.default_rng(0).integers(0, 20, (2, config.model.context))
    step = peer_nanogpt.make_step(config, batch, batch)
    losses = [step() for _ in range(20)]
    assert losses[-1] < losses[0] - 0.5


def test_estimator_fraction_goes_to_the_estimator_modes_only():
    modes = {name: benchmark.MODES[name] for name in ("ce", "head", "head_lazy")}
    changed = benchmark.with_estimator_fraction(modes, 0.25)
    assert changed["head_lazy"] == {**modes["head_lazy"], "barrier_fraction": 0.25}
    assert changed["ce"] == modes["ce"] and changed["head"] == modes["head"]
    assert benchmark.MODES["head_lazy"]["barrier_fraction"] == 1 / 32  # not modified


def test_estimator_spread_on_a_fraction_of_steps_is_wider():
    config = tiny.get_config()
    config.model.vocab_size = 20
    config.batch_size = 2
    [spread] = benchmark.estimator_spreads(config, 0.25, draws=4, step_fraction=0.25,
                                           samplings=("per_sequence",))
    assert spread["relative_std"] > 0
    # E[X^2]/q - E[X]^2 exceeds Var X for q < 1.
    assert spread["lazy_relative_std"] > spread["relative_std"]


def test_determinant_share_times_one_step_of_blocks():
    config = tiny.get_config()
    config.batch_size = 2
    share = benchmark.determinant_share(config, matmul_rate=1e11, repeats=1)
    model = config.model
    assert share["blocks"] == model.num_layers * 2 * model.num_heads * model.context
    assert share["block_size"] == model.d_model // model.num_heads
    assert share["ms"] > 0 and share["determinants_vs_floor"] == pytest.approx(
        share["ms"] / share["barrier_floor_ms"])


def test_lazy_pattern_is_one_barrier_step_in_n():
    programs = {4.0: "barrier step", 0.0: "CE-only step"}
    assert benchmark._step_pattern(programs, 0.25) == [4.0, 0.0, 0.0, 0.0]
    assert benchmark._step_pattern(programs, 0.3) == [4.0, 0.0, 0.0]  # 1/q rounded
    assert benchmark._step_pattern({1.0: "step"}, 1.0) == [1.0]


def test_median_interval_is_the_binomial_order_statistics_interval():
    """[x_(j), x_(n+1-j)] with the largest j whose coverage reaches 95%: j = 6 of 20 (95.9%;
    j = 7 covers 88.5%), j = 2 of 10 (97.9%); under 6 values, the whole range."""
    assert benchmark.median_interval(list(range(20, 0, -1))) == (6, 15)
    assert benchmark.median_interval([float(v) for v in range(1, 11)]) == (2.0, 9.0)
    assert benchmark.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert benchmark.median_interval([1.5]) == (1.5, 1.5)
    # A lower confidence narrows it: j = 7 of 20 covers 88.5% >= 80%.
    assert benchmark.median_interval(list(range(1, 21)), confidence=0.8) == (7, 14)


def test_a_ratio_goal_inside_the_medians_interval_is_within_noise():
    rows = [{"config": "c", "mode": "head_estimator", "position_fraction": 1 / 32,
             "step_vs_ce": 1.29, "step_vs_ce_interval": [1.24, 1.33]},
            {"config": "c", "mode": "small_gain_estimator", "position_fraction": 1 / 32,
             "step_vs_ce": 2.4, "step_vs_ce_interval": [2.3, 2.5]},
            {"config": "c", "mode": "prior_p8", "step_vs_ce": 1.0,
             "step_vs_ce_interval": [0.95, 1.08]}]
    targets = report.targets_table(rows, peer_tokens_per_s=19000)
    assert [(t["met"], t["decided"]) for t in targets] == [(True, False), (False, True),
                                                           (True, True)]
    assert targets[0]["measured"] == "1.29x (1.24-1.33)" and targets[2]["goal"] == "<= 1.1x"
    table = report.targets_markdown(targets)
    assert "| <= 1.3x | yes (within noise) |" in table and "| <= 1.3x | NO |" in table


def test_quartiles_of_paired_ratios():
    assert benchmark._quartiles([2.0]) == (2.0, 2.0, 2.0)
    assert benchmark._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_load_config_for_timing():
    label, config = benchmark.load_config("shakespeare_char", full_batch=4, bfloat16=True)
    assert label == "shakespeare_char (batch 4)" and config.batch_size == 4
    assert config.model.dtype == "bfloat16" and config.model.dropout == 0.0
    label, config = benchmark.load_config("shakespeare_char:cpu")
    assert label == "shakespeare_char:cpu" and config.batch_size == 12
    with pytest.raises(UserError, match="config 'nope': there is no"):
        benchmark.load_config("nope")
