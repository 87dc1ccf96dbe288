"""Step-time, memory and arithmetic-floor measurements behind ``scripts/benchmark.py``.

Every mode of one config is compiled, then timed in interleaved rounds so that machine noise
hits all modes alike: each round runs every mode's steps twice and times the second pass, so
no timing carries the cache and allocator state of another mode. The lazy barrier's pass is
one barrier step and 1/q - 1 CE-only steps (q rounded to 1/n), its mean step as in training.
A pass is ``steps_per_round`` repetitions of a mode's steps, so that one timing spans
more than a single step's jitter. Medians over rounds are reported; a mode's ratio to CE is
the median over rounds of its pass time over CE's in the same round (paired, so that the
machine's slower and faster minutes cancel), with the quartiles of those ratios and a
distribution-free 95% interval for their median (``median_interval``). Memory is
XLA's own account of the compiled step (arguments + outputs + temporaries - aliased), which
is deterministic. The barrier's *arithmetic floor* is its FLOP count from the shapes
(forward and backward = 3 x forward) divided by this machine's measured matmul rate.
"""

from __future__ import annotations

import functools
import importlib
import math
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stm_jax.core.penalties import DETERMINANT_PENALTIES
from stm_jax.errors import UserError
from stm_jax.trainer import flops, steps

# name -> objective overrides (and "microbatches", which overrides the config's own);
# "ce" is the baseline every ratio refers to.
MODES = {
    "ce": {"lambda_m": 0.0},
    # CE with the whole batch in one pass, to show what the config's microbatches buy.
    "ce_one_microbatch": {"lambda_m": 0.0, "microbatches": 1},
    "head": {"lambda_m": 0.02, "scope": "head"},
    "head_chunked": {"lambda_m": 0.02, "scope": "head", "chunk_size": 8},
    "layer": {"lambda_m": 0.02, "scope": "layer"},
    # The estimator on 1/32 of the positions (2 of 64 at shakespeare_char:cpu);
    # scripts/benchmark.py sets 2 positions per sequence for every config (with_estimator_fraction).
    "head_estimator": {"lambda_m": 0.02, "scope": "head", "barrier_fraction": 1 / 32},
    # The estimator on a random eighth of the steps (weighted by 8), timed as it trains: one
    # barrier step, then seven CE-only ones (see _step_pattern).
    "head_lazy": {"lambda_m": 0.02, "scope": "head", "barrier_fraction": 1 / 32,
                  "barrier_step_fraction": 0.125},
    # The readings (docs/math.md sections 9-10): the embedding prior (exact, every position
    # from the second), and each other penalty on the model's heads with the estimator.
    "prior_p8": {"lambda_m": 0.02, "barrier_target": "embedding_prior", "prior_dim": 8},
    "prior_full_width": {"lambda_m": 0.02, "barrier_target": "embedding_prior", "prior_dim": 0},
    **{f"{penalty}_estimator": {"lambda_m": 0.02, "scope": "head", "penalty": penalty,
                                "barrier_fraction": 1 / 32}
       for penalty in ("abs_log_capped", "margin_hinge", "small_gain", "logdet_squared")},
}

# The modes with a fraction of positions (set per config by with_estimator_fraction).
ESTIMATOR_MODES = ("head_estimator", "head_lazy", "abs_log_capped_estimator",
                   "margin_hinge_estimator", "small_gain_estimator", "logdet_squared_estimator")
PRIOR_MODES = ("prior_p8", "prior_full_width")
PEER_MODE = "nanogpt_torch"  # the row of the peer's step (see benchmark_config's ``peer``)


def with_estimator_fraction(modes: dict, fraction: float) -> dict:
    """``modes`` with the estimator modes' fraction of positions set to ``fraction``."""
    return {name: {**overrides, "barrier_fraction": fraction} if name in ESTIMATOR_MODES
            else overrides for name, overrides in modes.items()}


def load_config(spec: str, *, full_batch: int = 8, bfloat16: bool = False):
    """``(label, config)`` of ``configs/NAME.py`` for ``spec`` "NAME" or "NAME:variant", set
    up for timing: Tiny Shakespeare's 65 characters, no dropout, the full ``shakespeare_char``
    at batch ``full_batch`` (what fits this machine), bfloat16 matmuls on an accelerator."""
    name, _, variant = spec.partition(":")
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError:
        raise UserError(f"config {spec!r}: there is no configs/{name}.py") from None
    config = module.get_config(variant or None)
    config.model.vocab_size = 65
    config.model.dropout = 0.0
    if name == "shakespeare_char" and not variant.startswith("cpu"):
        config.batch_size = full_batch
        spec = f"{spec} (batch {full_batch})"
    if bfloat16:
        config.model.dtype = "bfloat16"
    return spec, config


def random_batch(config) -> np.ndarray:
    """A fixed batch of random tokens, (batch_size, context): what every timed step reads."""
    return np.random.default_rng(0).integers(
        0, config.model.vocab_size, (config.batch_size, config.model.context)).astype(np.int32)


def _mode_config(base, overrides: dict):
    config = ml_collections.ConfigDict(base.to_dict())
    overrides = dict(overrides)
    config.microbatches = overrides.pop("microbatches", config.microbatches)
    config.objective.update(overrides)
    return config


def _compile(config, inputs):
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    start = time.perf_counter()
    programs = steps.compile_train_steps(graphdef, config, tx, state, inputs, inputs)
    compile_s = time.perf_counter() - start
    peaks = [peak_bytes(program) for program in programs.values()]
    return programs, state, compile_s, max((p for p in peaks if p is not None), default=None)


def peak_bytes(program) -> int | None:
    """XLA's account of a compiled program's memory on one device: arguments + outputs +
    temporaries - what outputs share with donated arguments (None where XLA gives none)."""
    memory = program.memory_analysis()
    if memory is None:
        return None
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _timed_second_pass(calls: list) -> list[float]:
    """Seconds of each call in the second of two passes over ``calls``. The untimed first
    pass matters: right after another mode (the large layer-scope step especially) a step
    runs slower than on its own."""
    for call in calls:
        call()
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(run, repeats: int) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls after one untimed (compiling) call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_pattern(programs: dict, step_fraction: float) -> list[float]:
    """The barrier weights of a mode's steps in one timed pass, in order. The lazy barrier
    runs a barrier step, then 1/q - 1 CE-only ones: its mean step as in training, including
    what a switch between the two programs costs."""
    if len(programs) == 1:
        return list(programs)
    return [max(programs)] + [0.0] * (max(1, round(1 / step_fraction)) - 1)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of what ``values`` were drawn from: the
    order statistics [x_(j), x_(n+1-j)] for the largest j whose coverage, the probability
    that j <= Binomial(n, 1/2) <= n - j, is at least ``confidence``; the whole range when
    none is (fewer than 6 values at 95%). On this machine a paired ratio moves by a few
    hundredths between runs: the interval says whether a goal near the median is decided.
    """
    ordered, count = sorted(values), len(values)
    for j in range(count // 2, 0, -1):  # from the narrowest interval outwards
        covered = sum(math.comb(count, i) for i in range(j, count - j + 1)) / 2**count
        if covered >= confidence:
            return ordered[j - 1], ordered[count - j]
    return ordered[0], ordered[-1]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile (the median of a single value is itself)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    lower, middle, upper = statistics.quantiles(values, n=4, method="inclusive")
    return lower, middle, upper


def benchmark_config(name: str, config, modes: dict, *, rounds: int, matmul_rate: float,
                     steps_per_round: int = 1, peer=None, log=print) -> list[dict]:
    """Compile every mode of ``config``, time them interleaved, return one row per mode.

    ``peer``: optionally a module with ``make_step(config, inputs, targets)`` (such as
    ``peer_nanogpt``), whose step is timed in the same rounds as a row of its own.
    """
    inputs = random_batch(config)
    mode_configs = {mode: _mode_config(config, overrides) for mode, overrides in modes.items()}
    compiled, patterns = {}, {}
    for mode, mode_config in mode_configs.items():
        compiled[mode] = _compile(mode_config, inputs)
        patterns[mode] = _step_pattern(compiled[mode][0],
                                       modes[mode].get("barrier_step_fraction", 1.0))
        log(f"{name}/{mode}: compiled in {compiled[mode][2]:.1f}s")
    times = {mode: [] for mode in compiled}
    barrier_times = {mode: [] for mode, pattern in patterns.items() if len(pattern) > 1}
    peer_step = peer.make_step(config, inputs, inputs) if peer is not None else None
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for mode, (programs, state, _, _) in compiled.items():
            step_times = _timed_second_pass([
                lambda step=programs[weight], state=state: jax.block_until_ready(
                    step(state, inputs, inputs)) for weight in patterns[mode] * steps_per_round])
            times[mode].append(statistics.mean(step_times))
            if mode in barrier_times:
                barrier_times[mode].append(step_times[0])
        if peer_step is not None:
            times.setdefault(PEER_MODE, []).append(_timed_second_pass([peer_step])[0])
    tokens = config.batch_size * config.model.context
    model_flops = flops.model_flops_per_token(config.model)
    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    ce_time, ce_memory = median["ce"], compiled["ce"][3]
    ratios = {key: [mode_s / ce_s for mode_s, ce_s in zip(values[1:], times["ce"][1:],
                                                          strict=True)]
              for key, values in times.items()}
    paired = {key: _quartiles(values) for key, values in ratios.items()}

    def timing_row(mode, memory, compile_s, microbatches) -> dict:
        step_s = median[mode]
        return {"config": name, "mode": mode, "compile_s": compile_s,
                "microbatches": microbatches,
                "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
                "peak_memory_mb": None if memory is None else memory / 2**20,
                "mfu": tokens / step_s * model_flops / matmul_rate,
                "step_vs_ce": paired[mode][1],
                "step_vs_ce_quartiles": [paired[mode][0], paired[mode][2]],
                "step_vs_ce_interval": list(median_interval(ratios[mode])),
                "step_vs_ce_rounds": ratios[mode],
                "memory_vs_ce": None if memory is None else memory / max(ce_memory or 1, 1)}

    rows = []
    for mode, overrides in modes.items():
        _, _, compile_s, memory = compiled[mode]
        row = timing_row(mode, memory, compile_s, mode_configs[mode].microbatches)
        step_fraction = 1 / len(patterns[mode])  # the lazy barrier: one barrier step in n
        if mode in barrier_times:
            row.update(barrier_step_ms=1e3 * statistics.median(barrier_times[mode][1:]),
                       step_fraction=step_fraction)
        if overrides.get("lambda_m", 0) > 0:
            position_fraction = overrides.get("barrier_fraction", 1.0)
            row.update(position_fraction=position_fraction)
            # The floor counts the attention blocks' log-dets only (not the prior's blocks,
            # nor the SVDs of the singular-value penalties).
            determinants = overrides.get("penalty", "log_barrier") in DETERMINANT_PENALTIES
            if determinants and "scope" in overrides:
                floor_s = 3 * step_fraction * flops.barrier_forward_flops(
                    config.model, config.batch_size, overrides["scope"],
                    position_fraction) / matmul_rate
                row.update(floor_ms=1e3 * floor_s,
                           overhead_vs_floor=(median[mode] - ce_time) / floor_s)
        rows.append(row)
    if peer is not None:
        rows.append({**timing_row(PEER_MODE, None, 0.0, 1), "description": peer.describe()})
    for row in rows:
        memory_text = "" if row["peak_memory_mb"] is None else f", {row['peak_memory_mb']:.0f} MB"
        log(f"{name}/{row['mode']}: {row['step_ms']:.1f} ms/step, "
            f"{row['tokens_per_s']:,.0f} tok/s{memory_text}")
    return rows


def estimator_spreads(config, fraction: float, draws: int = 32, step_fraction: float = 1.0,
                      samplings=("per_sequence", "shared")) -> list[dict]:
    """Mean and spread of the subset estimator of the barrier against the exact value, one
    dict per way of drawing the positions (``objective.SAMPLINGS``).

    Evaluated at the initial parameters on one fixed batch (the whole batch in one pass: with
    "shared" sampling and microbatches, training draws one subset per microbatch, so its spread
    is somewhat smaller than this); each draw is a new subset key. The model, the batch and the
    exact value are shared by the samplings.
    With ``step_fraction`` q < 1 (the barrier on a random fraction q of steps, weighted by
    1/q) the per-step estimate is 0 or X/q, whose variance is E[X^2]/q - E[X]^2: reported as
    ``lazy_relative_std`` from the same draws.
    """
    from flax import nnx

    from stm_jax import objective
    from stm_jax.model import Record

    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, config.model.vocab_size,
                          (config.batch_size, config.model.context)).astype(np.int32)
    cfg = ml_collections.ConfigDict(config.objective.to_dict())
    cfg.update(lambda_m=0.02, scope="head")

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def barrier_value(params, key, fraction, sampling):
        model = nnx.merge(graphdef, params)
        positions = objective.barrier_positions(*inputs.shape, fraction, key, sampling)
        _, stats = model(inputs, record=Record(scope="head", positions=positions))
        return objective.penalty_term(stats, cfg, head=True)[0]

    exact = float(barrier_value(state["params"], None, 1.0, samplings[0]))
    spreads = []
    for sampling in samplings:
        estimates = np.array([float(barrier_value(state["params"], jax.random.PRNGKey(i),
                                                  fraction, sampling)) for i in range(draws)])
        lazy_std = math.sqrt(max(np.mean(estimates**2) / step_fraction - estimates.mean()**2,
                                 0.0))
        spreads.append({
            "fraction": fraction, "sampling": sampling, "exact": exact,
            "mean": float(estimates.mean()), "std": float(estimates.std(ddof=1)), "draws": draws,
            "relative_std": float(estimates.std(ddof=1) / abs(exact)) if exact else None,
            "step_fraction": step_fraction,
            "lazy_relative_std": lazy_std / abs(exact) if exact else None})
    return spreads


def determinant_share(config, matmul_rate: float, repeats: int = 5) -> dict:
    """The exact head barrier's determinants alone, against the whole barrier's floor.

    Times ``logdet.slogdet`` and its gradient (one LU, then two triangular solves) over as
    many ``p x p`` blocks as one training step factorises (layers x batch x heads x
    positions), on well-conditioned random blocks: the part of the barrier left to LAPACK.
    """
    from stm_jax.core import logdet

    model = config.model
    head_dim = model.d_model // model.num_heads
    count = model.num_layers * config.batch_size * model.num_heads * model.context
    noise = jax.random.normal(jax.random.PRNGKey(0), (count, head_dim, head_dim))
    blocks = jnp.eye(head_dim) + 0.3 * noise / math.sqrt(head_dim)
    gradient = jax.jit(jax.grad(lambda a: jnp.sum(logdet.slogdet(a)[1])))
    ms = 1e3 * _median_seconds(lambda: jax.block_until_ready(gradient(blocks)), repeats)
    floor_s = 3 * flops.barrier_forward_flops(model, config.batch_size, "head") / matmul_rate
    return {"blocks": count, "block_size": head_dim, "ms": ms,
            "barrier_floor_ms": 1e3 * floor_s, "determinants_vs_floor": ms / (1e3 * floor_s)}


def single_barrier_evaluation(tokens: int = 256, d_model: int = 384, num_heads: int = 6,
                              repeats: int = 5) -> list[dict]:
    """Time and XLA memory of one barrier evaluation (one sequence, one layer, float32).

    The value is the mean smooth barrier over the sequence's tokens, from the attention
    parameters and the layer input; forward only, and forward + gradient.
    """
    from stm_jax.core import attention, barrier

    params = attention.init_attention_params(jax.random.PRNGKey(0), d_model, num_heads,
                                             d_model // num_heads)
    u = jax.random.normal(jax.random.PRNGKey(1), (tokens, d_model))
    rows = []
    for scope in ("head", "layer"):
        def value(params, scope=scope):
            stats = attention.causal_self_attention(params, u, scope=scope)[1]
            if scope == "head":
                return jnp.mean(barrier.smooth_log_barrier(stats.head_sign, stats.head_logdet))
            return jnp.mean(barrier.smooth_log_barrier(stats.sign, stats.logdet))

        for kind, fn in (("forward", value), ("forward+grad", jax.grad(value))):
            compiled = jax.jit(fn).lower(params).compile()
            memory = compiled.memory_analysis()
            seconds = _median_seconds(
                lambda compiled=compiled: jax.block_until_ready(compiled(params)), repeats)
            rows.append({"scope": scope, "pass": kind, "ms": 1e3 * seconds,
                         "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else None})
    return rows
