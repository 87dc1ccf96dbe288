"""``reproduce(options)``: the seeded reproduction study behind ``scripts/reproduce.py``.

One call takes an experiment of ``stm_jax.experiments`` through these steps:

1. Check every input -- experiment and run names, seeds, jobs, overrides (against the real
   config), data files, and that existing workdirs were trained with the same settings --
   before anything is written. A mistake raises :class:`~stm_jax.errors.UserError`.
2. ``dry_run``: print the runs, their state and their commands; stop.
3. For runs left to do: describe the software and devices (an experiment that needs an
   accelerator is refused on CPU unless ``allow_cpu``), prepare TFDS data once, train and
   evaluate (``stm_jax.launch``), and append the command to ``invocations.jsonl`` when it
   brought runs to the end.
4. Write ``summary.json``, ``report.md`` (with ``notes.md`` as its discussion, when present)
   and the plots from every finished run in the experiment's folder.

``report_only`` does step 4 alone. Outcomes are returned; failures do not raise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections

from stm_jax import files
from stm_jax.errors import UserError
from stm_jax.study import environment, launch, plots, report
from stm_jax.study.experiments import Experiment, get_experiment, select_runs
from stm_jax.study.plan import (
    RunPlan,
    check_data,
    check_workdir_settings,
    plan_runs,
    run_state,
    shell_line,
)
from stm_jax.study.summary import build_summary

SUMMARY_FILE, REPORT_FILE = "summary.json", "report.md"
NOTES_FILE, INVOCATIONS_FILE = "notes.md", "invocations.jsonl"
ACCELERATORS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line of ``scripts/reproduce.py`` (see its flags)."""

    experiment: str
    seeds: int = 3
    runs: tuple[str, ...] = ()
    jobs: int = 1
    overrides: tuple[str, ...] = ()
    data_root: str | None = None
    output_dir: str = "results"
    allow_cpu: bool = False
    dry_run: bool = False
    report_only: bool = False
    command: str = ""  # as typed, for the report


def reproduce(options: Options, repo_root: Path,
              echo: Callable[[str], None] = print) -> list[launch.Outcome]:
    experiment = get_experiment(options.experiment)
    experiment_dir = Path(options.output_dir) / experiment.name
    if options.dry_run and options.report_only:
        raise UserError("--dry_run and --report_only exclude each other")
    if options.report_only:
        if not (experiment_dir / "runs").is_dir():
            raise UserError(f"{experiment_dir / 'runs'} does not exist: nothing to "
                                    "report; train first (drop --report_only)")
        write_outputs(experiment, experiment_dir, echo)
        return []
    if options.jobs < 1:
        raise UserError(f"--jobs={options.jobs} must be at least 1")
    runs = select_runs(experiment, list(options.runs))
    check_data(experiment, options.data_root)
    plans = plan_runs(experiment, runs, options.seeds, list(options.overrides),
                      data_root=options.data_root, experiment_dir=experiment_dir,
                      repo_root=repo_root)
    for plan in plans:
        check_workdir_settings(plan)
    todo = [plan for plan in plans if run_state(plan) != "evaluated"]
    if options.dry_run:
        echo(describe_plans(experiment, plans, todo))
        return []
    described = None
    if todo:
        described = environment.describe()
        check_devices(experiment, described, options.allow_cpu)
        if experiment.data.prepared_by_tfds:
            prepare_data(todo[0])
    echo(f"{experiment.name}: {len(plans)} runs, {len(todo)} to train or evaluate, "
         f"{options.jobs} at a time; logs in each run's folder under {experiment_dir / 'runs'}")
    outcomes = launch.run_all(plans, jobs=options.jobs, echo=echo)
    completed = [o.plan.label for o in outcomes if o.status in ("trained", "evaluated")]
    if completed and described:
        record_invocation(experiment_dir, options, described, completed)
    write_outputs(experiment, experiment_dir, echo)
    return outcomes


def describe_plans(experiment: Experiment, plans: list[RunPlan], todo: list[RunPlan]) -> str:
    lines = [f"{experiment.name}: {len(plans)} runs ({len(todo)} to train or evaluate)"]
    for plan in plans:
        lines += [f"{plan.label} [{run_state(plan)}]", f"  {shell_line(plan.train_command)}",
                  f"  {shell_line(plan.eval_command)}"]
        lines += [f"  {shell_line(command)}" for _, command in plan.curve]
    return "\n".join(lines)


def check_devices(experiment: Experiment, described: dict, allow_cpu: bool) -> None:
    backend = described["hardware"]["backend"]
    if experiment.needs_accelerator and backend not in ACCELERATORS and not allow_cpu:
        raise UserError(f"{experiment.name} needs a GPU or TPU (the JAX backend here is "
                         f"{backend}); pass --allow_cpu to run it anyway, e.g. with --override "
                         "to shrink it")


def prepare_data(plan: RunPlan) -> None:
    """Builds a TFDS dataset once, before concurrent runs would race to prepare it."""
    from stm_jax import data  # imports tensorflow_datasets: only when needed

    data.load_dataset(ml_collections.ConfigDict({
        key.removeprefix("data."): value for key, value in plan.config.items()
        if key.startswith("data.")}))


def record_invocation(experiment_dir: Path, options: Options, described: dict,
                      completed: list[str]) -> None:
    """One line per command that brought runs to the end, for the report's setup.

    A command interrupted or failing everywhere leaves no line: the command that later
    finishes its runs (the same one, rerun) is recorded then.
    """
    record = {"command": options.command, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seeds": options.seeds, "jobs": options.jobs, "overrides": list(options.overrides),
              "completed": completed, "environment": described}
    files.append_jsonl(experiment_dir / INVOCATIONS_FILE, record)


def write_outputs(experiment: Experiment, experiment_dir: Path,
                  echo: Callable[[str], None]) -> dict:
    """summary.json, the plots and report.md from every finished run in ``experiment_dir``."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(experiment, experiment_dir,
                            files.read_jsonl(experiment_dir / INVOCATIONS_FILE))
    files.write_json(experiment_dir / SUMMARY_FILE, summary)
    written = plots.write_plots(experiment, experiment_dir, summary)
    notes_path = experiment_dir / NOTES_FILE
    notes = notes_path.read_text(encoding="utf-8") if notes_path.is_file() else None
    files.write_text(experiment_dir / REPORT_FILE, report.format_report(summary, written, notes))
    verdicts = ", ".join(f"{claim['claim']}: {claim['verdict']}" for claim in summary["claims"])
    echo(f"wrote {experiment_dir / REPORT_FILE}, {SUMMARY_FILE} and plots {written} from "
         f"{len(summary['runs'])} finished runs | {verdicts}")
    return summary
