"""Sample text from a trained workdir: ``python scripts/sample.py --workdir=DIR --prompt=ROMEO``.

Prints the prompt followed by ``--num_chars`` generated characters. The same seed gives the
same text; ``--temperature=0`` picks the likeliest character each time.
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import app, flags, logging

from stm_jax.evaluation import sampling
from stm_jax.trainer import restore

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("prompt", None,
                    "Text to continue (default: the vocabulary's first character, usually a "
                    "newline).")
flags.DEFINE_integer("num_chars", 500, "Characters to generate.")
flags.DEFINE_float("temperature", 1.0, "Logits are divided by it; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest characters; 0 means all.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    model, _, vocab, _ = restore.load_trained(FLAGS.workdir, FLAGS.step)
    prompt = vocab.chars[0] if FLAGS.prompt is None else FLAGS.prompt
    text = sampling.sample(model, vocab, prompt, num_chars=FLAGS.num_chars,
                           temperature=FLAGS.temperature, top_k=FLAGS.top_k or None,
                           seed=FLAGS.seed)
    print(prompt + text)


if __name__ == "__main__":
    _bootstrap.run(main)
