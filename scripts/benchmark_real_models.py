"""Benchmark encoding and KV-cache sampling: ``python scripts/benchmark_real_models.py
--text_file=F``. Prints each measurement, then a table with the targets; writes
``benchmark.md`` and ``benchmark.json`` into ``--out`` (``stm_jax/bench/real_models.py``).
"""

import os
import sys
import tempfile
from pathlib import Path

import _bootstrap
from absl import flags, logging

from stm_jax.bench import real_models, report

flags.DEFINE_string("text_file", None, "UTF-8 text to encode (e.g. Tiny Shakespeare).")
flags.DEFINE_integer("repeat", 8, "Copies of the text in the encoded file.")
flags.DEFINE_integer("vocab_size", 16384, "BPE vocabulary trained on one copy of the text.")
flags.DEFINE_integer("num_layers", 12, "Layers of the random GPT-2-shaped model.")
flags.DEFINE_integer("d_model", 768, "Width of the random model.")
flags.DEFINE_integer("num_heads", 12, "Heads of the random model.")
flags.DEFINE_integer("context", 1024, "Context (n_positions) of the random model.")
flags.DEFINE_integer("vocab", 50257, "Vocabulary of the random model.")
flags.DEFINE_integer("num_tokens", 500, "Tokens sampled.")
flags.DEFINE_integer("recompute_tokens", 8, "Tokens timed for the recomputing sampler (its "
                     "cost per token is constant), scaled to --num_tokens.")
flags.DEFINE_string("out", "benchmarks/real_models", "Folder for benchmark.md and .json.")
flags.mark_flags_as_required(["text_file"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    log = lambda line: print(line, flush=True)  # noqa: E731
    encoding = real_models.encoding(Path(FLAGS.text_file), repeat=FLAGS.repeat,
                                    vocab_size=FLAGS.vocab_size, log=log)
    log(f"encoding: {encoding['mb_per_s']:.2f} MB/s")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = real_models.random_gpt2(
            Path(folder), num_layers=FLAGS.num_layers, d_model=FLAGS.d_model,
            num_heads=FLAGS.num_heads, context=FLAGS.context, vocab_size=FLAGS.vocab)
        speed = real_models.sampling_speed(checkpoint, num_tokens=FLAGS.num_tokens,
                                           recompute_tokens=FLAGS.recompute_tokens, log=log)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    result = {"machine": report.machine(f"{os.cpu_count()} cores, load average at the end "
                                        f"{load} (this run's own load included)"),
              "encoding": encoding, "sampling": speed, "command": " ".join(sys.argv)}
    report.write(FLAGS.out, result, real_models.format_report(result))

if __name__ == "__main__":
    _bootstrap.run(main)
