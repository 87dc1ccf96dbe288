"""From an experiment and the command line to concrete runs: configs, commands, state on disk.

Everything here is checked before anything is written: override syntax and keys (against the
real config, with the type ``config_flags`` will parse them as), the data files, run names.
A run's state is read from its workdir only, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shlex
from pathlib import Path
from typing import Any

import ml_collections

from stm_jax import files
from stm_jax.errors import UserError
from stm_jax.evaluation import RESULTS_FILE, output_name
from stm_jax.study.experiments import Experiment, Run
from stm_jax.trainer.workdir import CONFIG_FILE, SUMMARY_FILE, upgrade_config

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")
# Keys a resumed or reused workdir may differ in: data paths (the same file by another path),
# what the data fills in, and bookkeeping that does not change the trained model.
UNCHECKED_KEYS = ("data.", "mesh.", "model.vocab_size", "progress", "log_every", "eval_every",
                  "eval_batches", "checkpoint_every", "keep_checkpoints", "distributed",
                  "peak_flops")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One (run, seed): where it lives, how to train and evaluate it, when it is finished."""

    run: Run
    seed: int
    workdir: Path
    train_command: tuple[str, ...]  # script and arguments, run with this Python
    eval_command: tuple[str, ...]
    num_steps: int
    settings: dict[str, Any]  # the typed --config overrides, seed included
    config: dict[str, Any]  # the whole config they give, flattened ("model.d_model": 128)
    # A curve run's earlier checkpoints: (step, evaluation command), each writing
    # eval_results_step<N>.json (``curve_file``).
    curve: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.run.name}/seed{self.seed}"


def parse_override(text: str) -> tuple[str, str]:
    """``"model.d_model=16"`` -> ("model.d_model", "16")."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise UserError(f"--override={text!r} is not key=value (e.g. "
                         "--override=model.num_layers=1)")
    return key, value


def coerce(config: ml_collections.ConfigDict, key: str, value: Any) -> Any:
    """``value`` as the type of the config's ``key``; a missing key or bad value is an error."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise UserError(f"--override {key}: the config has no key {key!r}; check the spelling "
                         "against configs/common.py")
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"--override {key}: {key!r} is a group of keys; override one of them")
    if not isinstance(value, str) or current is None or isinstance(current, str):
        return value
    try:
        if isinstance(current, bool):
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            return value.lower() in TRUE_WORDS
        return type(current)(value)
    except ValueError:
        raise UserError(f"--override {key}={value}: expected a value of type "
                         f"{type(current).__name__}") from None


def format_value(value: Any) -> str:
    """How a value is written as ``--config.key=value``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_config(experiment: Experiment, run: Run) -> ml_collections.ConfigDict:
    """The config file's ``get_config(variants)``; the repository root must be importable."""
    module = importlib.import_module(experiment.config.removesuffix(".py").replace("/", "."))
    return module.get_config(variants(experiment, run))


def variants(experiment: Experiment, run: Run) -> str:
    return ",".join(word for word in (experiment.size, run.objective) if word)


def check_data(experiment: Experiment, data_root: str | None) -> None:
    if not data_root:
        raise UserError(f"{experiment.name} needs --data_root: the folder holding "
                         f"{' and '.join(experiment.data.files)}")
    missing = [name for name in experiment.data.files if not (Path(data_root) / name).is_file()]
    if missing:
        raise UserError(f"--data_root={data_root} has no {', '.join(missing)}; point "
                                "it at the folder holding the corpora (see the README)")


def run_settings(experiment: Experiment, run: Run, config, cli: list[tuple[str, str]], *,
                 data_root: str, experiment_dir: Path) -> dict[str, Any]:
    """Every ``--config.key=value`` of one run, typed, in precedence order (later wins)."""
    own = dict(run.overrides)
    for key, value in cli:
        if key in own and coerce(config, key, value) != own[key]:
            raise UserError(f"--override {key}={value} clashes with run {run.name}, which sets "
                             f"{key}={own[key]}; leave that run out with --runs")
    places = {"data_root": data_root, "experiment_dir": str(experiment_dir)}
    settings = {key: value.format(**places) if isinstance(value, str) else value
                for key, value in experiment.data.overrides}
    settings.update(experiment.defaults)
    settings.update(cli)
    settings.update(own)
    return {key: coerce(config, key, value) for key, value in settings.items()}


def plan_runs(experiment: Experiment, runs: tuple[Run, ...], seeds: int,
              cli_overrides: list[str], *, data_root: str, experiment_dir: Path,
              repo_root: Path) -> list[RunPlan]:
    """Every (run, seed) with its checked config and commands; raises on any bad input."""
    if seeds < 1:
        raise UserError(f"--seeds={seeds} must be at least 1")
    cli = [parse_override(text) for text in cli_overrides]
    here = Path.cwd()
    script = lambda name: os.path.relpath(repo_root / "scripts" / name, here)  # noqa: E731
    config_path = os.path.relpath(repo_root / experiment.config, here)
    plans = []
    for run in runs:
        config = load_config(experiment, run)
        settings = run_settings(experiment, run, config, cli, data_root=data_root,
                                experiment_dir=experiment_dir)
        num_steps = settings.get("num_steps", config.num_steps)
        for seed in range(seeds):
            workdir = experiment_dir / "runs" / run.name / f"seed{seed}"
            seeded = {"seed": seed, **settings}
            resolved = ml_collections.ConfigDict(config.to_dict())
            resolved.update_from_flattened_dict(seeded)
            train = (script("train.py"), f"--config={config_path}:{variants(experiment, run)}",
                     f"--workdir={workdir}",
                     *(f"--config.{key}={format_value(value)}" for key, value in seeded.items()))
            evaluate = (script("evaluate.py"), f"--workdir={workdir}", *experiment.eval_args)
            curve = tuple((step, (*evaluate, f"--step={step}", f"--output_tag=step{step}",
                                  *CURVE_EVAL_ARGS))
                          for step in curve_steps(run, resolved))
            plans.append(RunPlan(run, seed, workdir, train, evaluate, num_steps, seeded,
                                 files.flatten(resolved.to_dict()), curve))
    return plans


# The quality curve needs clean BPC and top-1 under the verdicts' noise only.
CURVE_EVAL_ARGS = ("--sigmas=0,0.5", "--margin_batches=1", "--support_windows=0")


def curve_steps(run: Run, config) -> list[int]:
    """The checkpoints a curve run evaluates besides its last: every checkpoint_every-th."""
    if not run.curve:
        return []
    return list(range(config.checkpoint_every, config.num_steps, config.checkpoint_every))


def curve_file(step: int) -> str:
    return output_name(RESULTS_FILE, f"step{step}")


def shell_line(command: tuple[str, ...]) -> str:
    return "python " + shlex.join(command)


def run_state(plan: RunPlan) -> str:
    """"evaluated" (nothing to do), "trained" (evaluate only) or "pending" (train, evaluate)."""
    if evaluated_step(plan) == plan.num_steps and not missing_curve(plan):
        return "evaluated"
    summary = files.read_json_or_none(plan.workdir / SUMMARY_FILE) or {}
    if summary.get("status") == "finished" and summary.get("step") == plan.num_steps:
        return "trained"
    return "pending"


def evaluated_step(plan: RunPlan) -> int | None:
    """The step of the run's standard evaluation on disk, if any."""
    return (files.read_json_or_none(plan.workdir / RESULTS_FILE) or {}).get("step")


def missing_curve(plan: RunPlan) -> list[tuple[int, tuple[str, ...]]]:
    """The curve evaluations whose results are not on disk yet."""
    return [(step, command) for step, command in plan.curve
            if (files.read_json_or_none(plan.workdir / curve_file(step)) or {}).get("step")
            != step]


def check_workdir_settings(plan: RunPlan) -> None:
    """A workdir trained with another config is neither resumed nor reused (see UNCHECKED_KEYS).

    Catches a changed --override, experiment default or config file between two invocations.
    The saved config is upgraded first (``workdir.upgrade_config``), as training reads it.
    """
    saved = files.read_json_or_none(plan.workdir / CONFIG_FILE)
    if saved is None:
        return
    saved = files.flatten(upgrade_config(saved))
    for key, wanted in plan.config.items():
        if key.startswith(UNCHECKED_KEYS) or saved.get(key, wanted) == wanted:
            continue
        raise UserError(f"{plan.workdir} was trained with {key}={saved[key]}, this command "
                        f"gives {wanted}; use another --output_dir or the original settings")
