"""Step-time, memory and arithmetic-floor measurements behind ``scripts/benchmark.py``.

Every mode of one config is compiled, then timed in interleaved rounds so that machine noise
hits all modes alike: each round runs every mode's steps twice and times the second pass, so
no timing carries the cache and allocator state of another mode. The lazy barrier's pass is
one barrier step and 1/q - 1 CE-only steps (q rounded to 1/n), its mean step as in training.
Medians over rounds are reported. Memory is XLA's own account of the compiled step
(arguments + outputs + temporaries - aliased), which is deterministic. The barrier's
*arithmetic floor* is its FLOP count from the shapes (forward and backward = 3 x forward)
divided by this machine's measured matmul rate.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stm_jax.trainer import metrics, steps

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
}


ESTIMATOR_MODES = ("head_estimator", "head_lazy")  # the modes with a fraction of positions
PEER_MODE = "nanogpt_torch"  # the row of the peer's step (see benchmark_config's ``peer``)


def with_estimator_fraction(modes: dict, fraction: float) -> dict:
    """``modes`` with the estimator modes' fraction of positions set to ``fraction``."""
    return {name: {**overrides, "barrier_fraction": fraction} if name in ESTIMATOR_MODES
            else overrides for name, overrides in modes.items()}


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


def _mode_config(base, overrides: dict):
    config = ml_collections.ConfigDict(base.to_dict())
    overrides = dict(overrides)
    config.microbatches = overrides.pop("microbatches", config.get("microbatches", 1))
    config.objective.update(overrides)
    return config


def _compile(config, inputs):
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    start = time.perf_counter()
    programs = {drawn: jax.jit(steps.make_train_step(
        graphdef, config, tx, barrier_selected=drawn)).lower(state, inputs, inputs).compile()
        for drawn in steps.barrier_draws(config)}
    compile_s = time.perf_counter() - start
    peaks = []
    for program in programs.values():
        memory = program.memory_analysis()
        if memory is not None:
            peaks.append(memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return programs, state, compile_s, max(peaks, default=None)


def _timed_second_pass(calls: list) -> list[float]:
    """Seconds of each call in the second of two passes over ``calls``. The untimed first
    pass matters: right after another mode (the 1.4 GB layer step especially) a step ran up
    to 1.6x slower than on its own."""
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


def _step_pattern(programs: dict, step_fraction: float) -> list:
    """The order in which a mode's programs run in one timed pass. The lazy barrier runs a
    barrier step, then 1/q - 1 CE-only ones: its mean step as in training, including what a
    program switch costs (the first CE-only step after a barrier step took 71 ms, not 42)."""
    if None in programs:
        return [None]
    return [True] + [False] * (max(1, round(1 / step_fraction)) - 1)


def benchmark_config(name: str, config, modes: dict, *, rounds: int, matmul_rate: float,
                     peer=None, log=print) -> list[dict]:
    """Compile every mode of ``config``, time them interleaved, return one row per mode.

    ``peer``: optionally a module with ``make_step(config, inputs, targets)`` (such as
    ``peer_nanogpt``), whose step is timed in the same rounds as a row of its own.
    """
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, config.model.vocab_size,
                          (config.batch_size, config.model.context)).astype(np.int32)
    mode_configs = {mode: _mode_config(config, overrides) for mode, overrides in modes.items()}
    compiled, patterns = {}, {}
    for mode, mode_config in mode_configs.items():
        compiled[mode] = _compile(mode_config, inputs)
        patterns[mode] = _step_pattern(compiled[mode][0],
                                       modes[mode].get("barrier_step_fraction", 1.0))
        log(f"{name}/{mode}: compiled in {compiled[mode][2]:.1f}s")
    times = {mode: [] for mode in compiled}
    barrier_times = {mode: [] for mode, pattern in patterns.items() if pattern[0] is True}
    peer_step = peer.make_step(config, inputs, inputs) if peer is not None else None
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for mode, (programs, state, _, _) in compiled.items():
            step_times = _timed_second_pass([
                lambda step=programs[drawn], state=state: jax.block_until_ready(
                    step(state, inputs, inputs)) for drawn in patterns[mode]])
            times[mode].append(statistics.mean(step_times))
            if mode in barrier_times:
                barrier_times[mode].append(step_times[0])
        if peer_step is not None:
            times.setdefault(PEER_MODE, []).append(_timed_second_pass([peer_step])[0])
    tokens = config.batch_size * config.model.context
    model_flops = metrics.transformer_flops_per_token(
        config.model.num_layers, config.model.d_model, config.model.num_heads,
        config.model.context, config.model.vocab_size, config.model.mlp_ratio)
    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    ce_time, ce_memory = median["ce"], compiled["ce"][3]

    def timing_row(mode, memory, compile_s, microbatches) -> dict:
        step_s = median[mode]
        return {"config": name, "mode": mode, "compile_s": compile_s,
                "microbatches": microbatches,
                "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
                "peak_memory_mb": None if memory is None else memory / 2**20,
                "mfu": tokens / step_s * model_flops / matmul_rate,
                "step_vs_ce": step_s / ce_time,
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
            floor_s = 3 * step_fraction * barrier_forward_flops(
                config.model, config.batch_size, overrides["scope"],
                position_fraction) / matmul_rate
            row.update(floor_ms=1e3 * floor_s, position_fraction=position_fraction,
                       overhead_vs_floor=(median[mode] - ce_time) / floor_s)
        rows.append(row)
    if peer is not None:
        rows.append({**timing_row(PEER_MODE, None, 0.0, 1), "description": peer.describe()})
    for row in rows:
        memory_text = "" if row["peak_memory_mb"] is None else f", {row['peak_memory_mb']:.0f} MB"
        log(f"{name}/{row['mode']}: {row['step_ms']:.1f} ms/step, "
            f"{row['tokens_per_s']:,.0f} tok/s{memory_text}")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of every measurement."""
    header = ("| config | mode | microbatches | step ms | tokens/s | x CE time | peak MB | "
              "x CE memory | MFU | barrier floor ms | overhead / floor | compile s |")
    lines = [header, "|" + "---|" * 12]
    number = lambda r, key, form: "-" if r.get(key) is None else format(r[key], form)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['config']} | {r['mode']} | {r.get('microbatches', 1)} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['step_vs_ce']:.2f} | "
                     f"{number(r, 'peak_memory_mb', '.0f')} | "
                     f"{number(r, 'memory_vs_ce', '.2f')} | {100 * r['mfu']:.1f}% | "
                     f"{number(r, 'floor_ms', '.1f')} | {number(r, 'overhead_vs_floor', '.2f')} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def estimator_spread(config, fraction: float, draws: int = 32, step_fraction: float = 1.0,
                     sampling: str = "per_sequence") -> dict:
    """``estimator_spreads`` for one way of drawing the positions."""
    return estimator_spreads(config, fraction, draws, step_fraction, samplings=(sampling,))[0]


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
        _, stats = model(inputs, scope="head", positions=positions)
        return objective.barrier_term(stats, cfg)[0]

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


def _fraction_text(fraction: float) -> str:
    """0.03125 -> "1/32", 1 -> "all"; fractions that are not one over a whole number as they
    are."""
    inverse = 1 / fraction
    if abs(inverse - round(inverse)) >= 1e-9:
        return f"{fraction:g}"
    return "all" if round(inverse) == 1 else f"1/{round(inverse)}"


def targets_table(rows: list[dict], *, peer_tokens_per_s: float) -> tuple[str, list[dict]]:
    """The issue's targets, each with the measured value next to it and whether it is met."""
    by = {(r["config"], r["mode"]): r for r in rows}
    targets = []

    def add(name, measured, goal, met):
        targets.append({"target": name, "measured": measured, "goal": goal, "met": bool(met)})

    for config in dict.fromkeys(r["config"] for r in rows):
        for mode in ("head", "head_chunked"):
            if (config, mode) in by:
                r = by[(config, mode)]
                add(f"{config}: {mode} barrier peak memory / CE", f"{r['memory_vs_ce']:.2f}x",
                    "<= 1.5x", r["memory_vs_ce"] <= 1.5)
                add(f"{config}: {mode} barrier overhead / arithmetic floor",
                    f"{r['overhead_vs_floor']:.2f}x", "<= 1.3x", r["overhead_vs_floor"] <= 1.3)
        for mode in ESTIMATOR_MODES:
            if (config, mode) in by:
                r = by[(config, mode)]
                positions = f"estimator on {_fraction_text(r['position_fraction'])} of positions"
                what = (f"{positions}, step time" if "step_fraction" not in r else
                        f"{positions} and {_fraction_text(r['step_fraction'])} of steps, "
                        "mean step time")
                add(f"{config}: {what} / CE", f"{r['step_vs_ce']:.2f}x", "<= 1.3x",
                    r["step_vs_ce"] <= 1.3)
        if (config, "ce") in by and (config, PEER_MODE) in by:
            r, peer = by[(config, "ce")], by[(config, PEER_MODE)]
            add(f"{config}: CE-only tokens/s vs nanoGPT ({peer['description']}), same run",
                f"{r['tokens_per_s']:,.0f}", f">= {peer['tokens_per_s']:,.0f}",
                r["tokens_per_s"] >= peer["tokens_per_s"])
        elif config.startswith("shakespeare_char:cpu") and (config, "ce") in by:
            r = by[(config, "ce")]
            add(f"{config}: CE-only tokens/s (nanoGPT eager CPU ~{peer_tokens_per_s:,.0f})",
                f"{r['tokens_per_s']:,.0f}", f">= {peer_tokens_per_s:,.0f}",
                r["tokens_per_s"] >= peer_tokens_per_s)
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
              for t in targets]
    return "\n".join(lines), targets


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
    floor_s = 3 * barrier_forward_flops(model, config.batch_size, "head") / matmul_rate
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
