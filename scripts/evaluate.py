"""Evaluate a trained workdir: ``python scripts/evaluate.py --workdir=DIR``.

Writes ``eval_results.json``, ``eval_report.md``, ``bpc_vs_sigma.png``, ``margin_hist.png``
and ``margins.npz`` into the workdir (checkpoints are only read) and prints a short summary.
The metrics are those of docs/math.md section 6; ``stm_jax.evaluate.evaluate_workdir`` does
the work.
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
from absl import app, flags, logging

from stm_jax import evaluation
from stm_jax.errors import UserError
from stm_jax.evaluation import evaluate

flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_list("sigmas", [str(s) for s in evaluate.DEFAULT_SIGMAS],
                  "Embedding-noise scales, comma-separated.")
flags.DEFINE_list("noise_modes", list(evaluate.NOISE_MODES), "absolute and/or relative.")
flags.DEFINE_list("splits", ["validation", "test"], "Splits to score (missing ones are skipped).")
flags.DEFINE_integer("max_batches", 0, "Batches per split and condition; 0 means all.")
flags.DEFINE_integer("margin_batches", 2, "Validation batches for margins (one SVD per token).")
flags.DEFINE_integer("margin_batch_size", 8, "Windows per margin batch.")
flags.DEFINE_float("tau", 0.1, "Support tokens: margin m_t <= tau.")
flags.DEFINE_integer("bottom_k", 8, "Support tokens: the k smallest margins per window.")
flags.DEFINE_integer("support_windows", 3, "Validation windows shown with their support tokens.")
flags.DEFINE_integer("seed", 0, "Seed of the embedding noise.")
flags.DEFINE_integer("noise_layer", 0, "Put the noise on the residual stream entering this "
                     "block instead of the embedding (0); results go to files named "
                     "*_noise_layerL.*.")
flags.DEFINE_string("output_tag", "", "Name the result files eval_results_TAG.json etc. "
                    "(the standard files are left alone).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def parse_sigmas(values: list[str]) -> list[float]:
    try:
        return [float(value) for value in values]
    except ValueError:
        raise UserError(f"--sigmas={','.join(values)} must be comma-separated numbers") from None


def summary_lines(results: dict) -> list[str]:
    """The headline numbers; the report has the rest."""
    lines = [f"step {results['step']}"]
    bits = results["settings"]["bits"]
    name, unit = ("bpc", "chars") if bits == "bpc" else ("bits/token", "tokens")
    for split, split_results in results["splits"].items():
        clean = split_results["clean"]
        lines.append(f"{split}: {name} {clean[bits]:.4f} | bpb {clean['bpb']:.4f} | top-1 "
                     f"{clean['accuracy']:.3f} | {clean['num_tokens']:,} {unit}")
        for mode, rows in split_results["robustness"].items():
            cells = ", ".join(f"{row['sigma']:g}: {row[bits]:.3f}" for row in rows)
            lines.append(f"  {mode} noise, {name} at sigma {cells}")
    lines += [f"{split}: skipped ({reason})" for split, reason in
              results["skipped_splits"].items()]
    for layer in results["margins"]["layers"]:
        lines.append(f"layer {layer['layer']} margins: min {layer['margin_min']:.4f} | 5% "
                     f"{layer['margin_q05']:.4f} | infeasible {layer['infeasible_fraction']:.2%}"
                     f" | noise gain {layer['noise_gain']:.3f}")
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    results = evaluate.evaluate_workdir(
        FLAGS.workdir, step=FLAGS.step, sigmas=parse_sigmas(FLAGS.sigmas),
        noise_modes=FLAGS.noise_modes, splits=FLAGS.splits,
        max_batches=FLAGS.max_batches or None, margin_batches=FLAGS.margin_batches,
        margin_batch_size=FLAGS.margin_batch_size, tau=FLAGS.tau, bottom_k=FLAGS.bottom_k,
        support_windows=FLAGS.support_windows, seed=FLAGS.seed, noise_layer=FLAGS.noise_layer,
        output_tag=FLAGS.output_tag)
    print("\n".join(summary_lines(results)))
    tag = evaluation.result_tag(FLAGS.output_tag, FLAGS.noise_layer)
    names = [evaluation.output_name(name, tag) for name in (
        evaluation.REPORT_FILE, evaluation.RESULTS_FILE, evaluation.BPC_PLOT,
        evaluation.MARGIN_PLOT, evaluation.MARGINS_FILE)]
    print(f"wrote {', '.join(names)} in {FLAGS.workdir}")


if __name__ == "__main__":
    _bootstrap.run(main)
