"""Seeded reproduction study: ``python scripts/reproduce.py --experiment=NAME --data_root=DIR``.

Trains every run of the experiment (``stm_jax/study/experiments.py``) once per seed with
``scripts/train.py``, evaluates each with ``scripts/evaluate.py``, and writes
``OUTPUT_DIR/NAME/``: ``summary.json``, ``report.md`` and plots. Rerunning the same command
resumes: finished runs are skipped, interrupted ones continue from their checkpoints.
``--report_only`` regenerates the summary, report and plots without training.

Exit codes: 0 done; 1 some runs failed (named on stderr; the report covers the others); 2 a
mistake in the command (one ``error:`` line, nothing written); 130 interrupted.
"""

import shlex
import sys
from pathlib import Path

import _bootstrap
from absl import app, flags

from stm_jax.study import experiments, reproduce

flags.DEFINE_string("experiment", None, f"One of {', '.join(experiments.EXPERIMENTS)}.")
flags.DEFINE_integer("seeds", 3, "Seeds 0 .. seeds-1 for every run.")
flags.DEFINE_list("runs", [], "Only these runs (comma-separated names); default: all.")
flags.DEFINE_integer("jobs", 1, "Trainings to run at the same time (the README says what 2 "
                     "bought on 2 cores).")
flags.DEFINE_multi_string("override", [], "key=value, passed to every run as --config.key=value "
                          "(repeatable), e.g. to shrink an experiment.")
flags.DEFINE_string("data_root", None, "Folder with tinyshakespeare/input.txt and "
                    "wikitext-2-raw/wiki.{test,valid}.raw.")
flags.DEFINE_string("output_dir", "results", "Studies are written to OUTPUT_DIR/NAME/.")
flags.DEFINE_bool("allow_cpu", False, "Run an experiment that needs a GPU or TPU on CPU.")
flags.DEFINE_bool("dry_run", False, "Print the runs and their commands; train nothing.")
flags.DEFINE_bool("report_only", False, "Regenerate summary, report and plots; train nothing.")
flags.mark_flags_as_required(["experiment"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = reproduce.Options(
        experiment=FLAGS.experiment, seeds=FLAGS.seeds, runs=tuple(FLAGS.runs), jobs=FLAGS.jobs,
        overrides=tuple(FLAGS.override), data_root=FLAGS.data_root, output_dir=FLAGS.output_dir,
        allow_cpu=FLAGS.allow_cpu, dry_run=FLAGS.dry_run, report_only=FLAGS.report_only,
        command="python scripts/reproduce.py " + shlex.join(sys.argv[1:]))
    outcomes = reproduce.reproduce(options, Path(__file__).resolve().parents[1],
                                   echo=lambda line: print(line, flush=True))
    failed = [outcome.plan.label for outcome in outcomes if outcome.status == "failed"]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} runs failed: {', '.join(failed)}; see "
              "their logs above, fix the cause and rerun the same command to resume",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _bootstrap.run(main)
