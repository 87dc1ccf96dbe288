"""Benchmark CE-only against the barrier modes: ``python scripts/benchmark.py``.

Prints per-config progress, a table of every measurement and, last, a table of the targets
with the measured value next to each; writes both to ``--out`` as JSON and markdown.
``--device=gpu`` runs matmuls in bfloat16 (softmax, losses and determinants stay float32).
"""

import sys

import _bootstrap
import jax
from absl import flags, logging

from stm_jax import objective
from stm_jax.bench import benchmark, report
from stm_jax.errors import UserError
from stm_jax.trainer import flops

flags.DEFINE_list("configs", ["tiny", "shakespeare_char:cpu", "shakespeare_char"],
                  "Configs from configs/, with an optional :variant.")
flags.DEFINE_list("modes", list(benchmark.MODES), f"Subset of {list(benchmark.MODES)}.")
flags.DEFINE_integer("full_batch", 8, "Batch for the full shakespeare_char config (fits here).")
flags.DEFINE_integer("rounds", 10, "Interleaved timing rounds after one warm-up round.")
flags.DEFINE_integer("steps_per_round", 5,
                     "Each mode's steps timed in a row per round (its pattern, repeated).")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu", "tpu"], "gpu/tpu: bfloat16 matmuls.")
flags.DEFINE_integer("estimator_positions", 2,
                     "Positions per sequence for the estimator modes (head_estimator, head_lazy): "
                     "the fraction positions / context of each config (1/32 at context 64).")
flags.DEFINE_float("estimator_fraction", None,
                   "Fraction of positions for the estimator modes, instead of "
                   "--estimator_positions.")
flags.DEFINE_float("lazy_step_fraction", benchmark.MODES["head_lazy"]["barrier_step_fraction"],
                   "Fraction of steps that evaluate the estimator in the head_lazy mode.")
flags.DEFINE_float("peer_tokens_per_s", 19000.0,
                   "nanoGPT eager CPU rate to compare CE with when --peer is off.")
flags.DEFINE_bool("peer", False,
                  "Also time nanoGPT's PyTorch step (needs torch) in the same rounds, and compare "
                  "CE-only with it instead of --peer_tokens_per_s.")
flags.DEFINE_bool("single_barrier", True,
                  "Also time one barrier evaluation at T=256, d=384, H=6 (float32).")
flags.DEFINE_string("out", "benchmarks", "Folder for benchmark.json and benchmark.md.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = [name for name in FLAGS.modes if name not in benchmark.MODES]
    if unknown:
        raise UserError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(benchmark.MODES)}")
    modes = {name: dict(benchmark.MODES[name]) for name in FLAGS.modes}
    if "head_lazy" in modes:
        modes["head_lazy"]["barrier_step_fraction"] = FLAGS.lazy_step_fraction
    peer = None
    if FLAGS.peer:
        try:
            from stm_jax.bench import peer_nanogpt as peer
        except ImportError as error:
            raise UserError(f"--peer: {error}") from None
    configs = []  # (label, config, the estimator's fraction), checked before any timing
    for spec in FLAGS.configs:
        label, config = benchmark.load_config(spec, full_batch=FLAGS.full_batch,
                                              bfloat16=FLAGS.device != "cpu")
        fraction = FLAGS.estimator_fraction or FLAGS.estimator_positions / config.model.context
        if not 0 < fraction <= 1:
            raise UserError(f"{spec}: the estimator's fraction of positions is {fraction:g}; "
                            "--estimator_positions must be 1 to the context length, "
                            "--estimator_fraction in (0, 1]")
        configs.append((label, config, fraction))
    rate = flops.measure_matmul_flops()
    print(f"measured 2048^2 float32 matmul: {rate / 1e9:.0f} GFLOP/s on "
          f"{jax.devices()[0].device_kind}", flush=True)
    rows, spreads, determinants = [], [], []
    for label, config, fraction in configs:
        rows += benchmark.benchmark_config(
            label, config, benchmark.with_estimator_fraction(modes, fraction),
            rounds=FLAGS.rounds, steps_per_round=FLAGS.steps_per_round, matmul_rate=rate,
            peer=peer, log=lambda s: print(s, flush=True))
        if any(mode in modes for mode in benchmark.ESTIMATOR_MODES):
            spreads += [{"config": label, **spread} for spread in benchmark.estimator_spreads(
                config, fraction, step_fraction=FLAGS.lazy_step_fraction,
                samplings=objective.SAMPLINGS)]
        if "head" in modes:
            determinants.append({"config": label, **benchmark.determinant_share(config, rate)})
    single = benchmark.single_barrier_evaluation() if FLAGS.single_barrier else []
    result = {
        "machine": report.machine(f"matmul {rate / 1e9:.0f} GFLOP/s"),
        "matmul_flops": rate, "rows": rows, "estimator": spreads, "determinants": determinants,
        "single_barrier": single,
        "targets": report.targets_table(rows, peer_tokens_per_s=FLAGS.peer_tokens_per_s),
        "command": " ".join(sys.argv)}
    report.write(FLAGS.out, result, report.format_report(result))


if __name__ == "__main__":
    _bootstrap.run(main)
