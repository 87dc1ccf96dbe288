"""Where a barrier mode's training step spends its time beyond CE-only's:
``python scripts/profile_step.py --config=shakespeare_char:cpu --mode=head_estimator``.

Compiles the CE-only step and the mode's step as ``scripts/benchmark.py`` does, traces
``--steps`` of each with ``jax.profiler``, and prints milliseconds per step by kind of XLA
operation (``dot``, ``lu``, ``triangular_solve``, ``while``, fusions) and by the JAX operation
each came from, for the mode, for CE-only, and the difference. Operations on two threads
overlap, so their sum exceeds the wall time, which is printed too. ``stm_jax/bench/profile.py``
says how events are grouped.
"""

import gzip
import json
import tempfile
from pathlib import Path

import _bootstrap
import jax
from absl import flags, logging

from stm_jax.bench import benchmark, profile
from stm_jax.errors import UserError

flags.DEFINE_string("config", "shakespeare_char:cpu", "A config from configs/, NAME[:variant].")
flags.DEFINE_string("mode", "head_estimator", f"One of {', '.join(benchmark.MODES)}.")
flags.DEFINE_integer("steps", 10, "Steps traced per program, after warm-up.")
flags.DEFINE_integer("top", 25, "Rows per table.")
flags.DEFINE_integer("estimator_positions", 2, "Positions per sequence in the estimator modes.")
FLAGS = flags.FLAGS


def compiled_step(config, overrides: dict, inputs):
    """The mode's step (its barrier step, for the lazy modes), its state and program text."""
    programs, state, _, _ = benchmark._compile(benchmark._mode_config(config, overrides), inputs)
    program = programs[max(programs)]
    return (lambda: jax.block_until_ready(program(state, inputs, inputs))), program.as_text()


def traced(step, steps: int) -> tuple[list[dict], float]:
    """Trace events of ``steps`` calls of ``step``, and the median wall milliseconds of a step
    in a separate untraced run before them."""
    wall_ms = 1e3 * benchmark._median_seconds(step, steps)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        trace = max(Path(folder).rglob("*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
        with gzip.open(trace) as stream:
            events = json.load(stream)["traceEvents"]
    return events, wall_ms


def print_table(title: str, mode: dict, base: dict, top: int) -> None:
    print(f"\n{title}\n{'extra ms':>9} {'mode ms':>8} {'CE ms':>8}  operation")
    for key, extra in profile.difference(mode, base)[:top]:
        print(f"{extra:9.2f} {mode.get(key, 0.0):8.2f} {base.get(key, 0.0):8.2f}  {key}")
    print(f"{sum(mode.values()) - sum(base.values()):9.2f} {sum(mode.values()):8.2f} "
          f"{sum(base.values()):8.2f}  all operations (both threads)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.mode not in benchmark.MODES or FLAGS.mode == "ce":
        raise UserError(f"--mode={FLAGS.mode}: choose one of "
                        f"{', '.join(mode for mode in benchmark.MODES if mode != 'ce')}")
    if FLAGS.steps < 1:
        raise UserError(f"--steps={FLAGS.steps}: must be at least 1")
    label, config = benchmark.load_config(FLAGS.config)
    fraction = FLAGS.estimator_positions / config.model.context
    modes = benchmark.with_estimator_fraction(
        {"ce": benchmark.MODES["ce"], FLAGS.mode: benchmark.MODES[FLAGS.mode]}, fraction)
    inputs = benchmark.random_batch(config)
    results = {}
    for name, overrides in modes.items():
        print(f"{label}/{name}: compiling and tracing {FLAGS.steps} steps", flush=True)
        step, text = compiled_step(config, overrides, inputs)
        events, wall_ms = traced(step, FLAGS.steps)
        table = profile.instructions(text)
        results[name] = (profile.step_times(events, table, FLAGS.steps), table, wall_ms)
    (base, base_table, base_wall), (mode, mode_table, mode_wall) = results.values()
    print(f"\nwall time per step: {FLAGS.mode} {mode_wall:.1f} ms, ce {base_wall:.1f} ms "
          f"({mode_wall / base_wall:.2f}x; one run, not interleaved: scripts/benchmark.py "
          "times ratios)")
    for by in ("kind", "source"):
        print_table(f"milliseconds per step by {by}", profile.grouped(mode, mode_table, by),
                    profile.grouped(base, base_table, by), FLAGS.top)


if __name__ == "__main__":
    _bootstrap.run(main)
