"""Margins, log-dets, barrier and support tokens of a model on a text:
``python scripts/analyze.py --checkpoint=PATH --text_file=F --out=DIR``.

``--checkpoint`` is a training workdir or a Hugging Face GPT-2 directory (config.json,
model.safetensors and its tokenizer.json; ``--tokenizer=PATH`` when it has none). Writes
``analysis.json``, ``analysis.md``, ``margins.png``, ``head_margins.png``, ``analysis.npz``
and ``analysis.html`` into ``--out`` and prints the per-layer summary.
``stm_jax/evaluation/analyze.py`` does the work; ``--scope=layer`` adds the exact layer
blocks (the README says what that costs at d = 768).
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import app, flags, logging

from stm_jax.evaluation import analyze

flags.DEFINE_string("checkpoint", None, "Training workdir or Hugging Face GPT-2 directory.")
flags.DEFINE_string("text_file", None, "UTF-8 text to analyse.")
flags.DEFINE_string("out", None, "Folder for the outputs (created if missing).")
flags.DEFINE_string("tokenizer", None, "tokenizer.json for a GPT-2 directory that lacks one.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_enum("scope", "head", list(analyze.SCOPES), "head: per-head blocks; layer: also "
                  "the exact layer blocks (a d x d SVD per token and layer).")
flags.DEFINE_integer("max_tokens", 512, "Tokens of the text analysed (from its start).")
flags.DEFINE_float("tau", 0.1, "Support tokens: margin <= tau.")
flags.DEFINE_integer("bottom_k", 8, "Support tokens: the k smallest margins of each window.")
flags.DEFINE_float("barrier_eps", 1e-2, "The smooth barrier's eps.")
flags.DEFINE_integer("chunk_size", 32, "Positions per chunk of the Jacobian statistics.")
flags.DEFINE_bool("progress", True, "A progress bar on stderr.")
flags.mark_flags_as_required(["checkpoint", "text_file", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    results = analyze.analyze(
        FLAGS.checkpoint, FLAGS.text_file, FLAGS.out, tokenizer=FLAGS.tokenizer,
        step=FLAGS.step, scope=FLAGS.scope, max_tokens=FLAGS.max_tokens, tau=FLAGS.tau,
        bottom_k=FLAGS.bottom_k, barrier_eps=FLAGS.barrier_eps, chunk_size=FLAGS.chunk_size,
        progress=FLAGS.progress)
    print(f"{results['checkpoint']}: {results['num_tokens']} tokens, "
          f"{results['settings']['scope']} scope")
    for layer in results["layers"]:
        q = layer["margin_quantiles"]
        print(f"layer {layer['layer']}: margin min {q['q00']:.4g} | 5% {q['q05']:.4g} | "
              f"median {q['q50']:.4g} | infeasible {layer['infeasible_fraction']:.1%} | "
              f"barrier mean {layer['barrier_mean']:.4g} | {len(layer['support'])} support "
              "tokens")
    print(f"wrote {analyze.ANALYSIS_FILE}, {analyze.REPORT_FILE}, {analyze.HTML_FILE}, "
          f"{analyze.MARGIN_PLOT}, {analyze.HEAD_PLOT} and {analyze.ARRAYS_FILE} in {FLAGS.out}")


if __name__ == "__main__":
    _bootstrap.run(main)
