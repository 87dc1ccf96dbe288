"""Sample text: ``python scripts/sample.py --workdir=DIR --prompt=ROMEO`` (a training run), or
``--checkpoint=DIR`` (a training run or a Hugging Face GPT-2 directory).

Prints the prompt followed by ``--num_tokens`` generated tokens (characters for a character
model). The same seed gives the same text; ``--temperature=0`` picks the likeliest token each
time. Sampling uses a key-value cache (``stm_jax/evaluation/sampling.py``).
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import app, flags, logging

from stm_jax.errors import UserError
from stm_jax.evaluation import sampling
from stm_jax.trainer import restore

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints.")
flags.DEFINE_string("checkpoint", None, "A training workdir or a Hugging Face GPT-2 directory "
                    "(config.json, model.safetensors, tokenizer.json).")
flags.DEFINE_string("tokenizer", None, "tokenizer.json for a GPT-2 directory that lacks one.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_string("prompt", None,
                    "Text to continue (default: a character model's first character, usually a "
                    "newline; a newline for a subword model).")
flags.DEFINE_integer("num_tokens", None, "Tokens to generate (default: --num_chars).")
flags.DEFINE_integer("num_chars", 500, "Characters to generate (a character model's tokens).")
flags.DEFINE_float("temperature", 1.0, "Logits are divided by it; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens; 0 means all.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise UserError("pass exactly one of --workdir and --checkpoint")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    model, tokenizer, _ = restore.load_checkpoint(FLAGS.workdir or FLAGS.checkpoint,
                                                  tokenizer=FLAGS.tokenizer, step=FLAGS.step)
    prompt = FLAGS.prompt
    if prompt is None:
        prompt = tokenizer.chars[0] if tokenizer.kind == "char" else "\n"
    text = sampling.sample(model, tokenizer, prompt,
                           num_tokens=FLAGS.num_tokens if FLAGS.num_tokens is not None
                           else FLAGS.num_chars, temperature=FLAGS.temperature,
                           top_k=FLAGS.top_k or None, seed=FLAGS.seed)
    print(prompt + text)


if __name__ == "__main__":
    _bootstrap.run(main)
