"""``summary.json`` of an experiment: per-run headline numbers, per-variant means, the claims.

A run counts when its workdir holds ``train_summary.json`` of a finished run and
``eval_results.json`` of that same step; every seed folder found counts, whichever command
trained it, so a study can be run in pieces. Numbers come only from those files.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from stm_jax import files
from stm_jax.evaluation import RESULTS_FILE
from stm_jax.study import claims
from stm_jax.study.experiments import BARRIER_RUN, CE_RUN, Experiment
from stm_jax.trainer.workdir import CONFIG_FILE, SUMMARY_FILE, upgrade_config

CONFIG_KEYS = ("num_steps", "batch_size", "seed")
OBJECTIVE_KEYS = ("variant", "lambda_m", "lambda_s", "layers", "scope", "barrier_fraction",
                  "barrier_step_fraction", "barrier_floor")
MODEL_KEYS = ("num_layers", "num_heads", "d_model", "context")


def _number(value) -> float | None:
    """JSON numbers, and evaluate.py's "nan"/"inf" strings, as floats; anything else None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def headline_metrics(results: dict, train_summary: dict) -> dict[str, float | None]:
    """The flat numbers a study compares, from eval_results.json and train_summary.json."""
    metrics = {}
    for split, split_results in results["splits"].items():
        prefix = "val" if split == "validation" else split
        metrics[f"{prefix}_bpc"] = _number(split_results["clean"]["bpc"])
        metrics[f"{prefix}_accuracy"] = _number(split_results["clean"]["accuracy"])
    for mode, rows in results["splits"]["validation"]["robustness"].items():
        for row in rows:
            metrics[f"bpc_{mode}_{row['sigma']:g}"] = _number(row["bpc"])
            metrics[f"accuracy_{mode}_{row['sigma']:g}"] = _number(row["accuracy"])
    layers = results["margins"]["layers"]
    for layer in layers:
        index = layer["layer"]
        metrics[f"margin_min_layer{index}"] = _number(layer["margin_min"])
        metrics[f"margin_q05_layer{index}"] = _number(layer["margin_q05"])
        metrics[f"infeasible_fraction_layer{index}"] = _number(layer["infeasible_fraction"])
        metrics[f"support_count_layer{index}"] = _number(layer["support_threshold_count"])
    # Over layers: the worst layer's statistics; every layer has the same tokens, so the
    # pooled infeasible fraction is the mean and the pooled support count the sum.
    metrics["margin_min"] = min(_number(layer["margin_min"]) for layer in layers)
    metrics["margin_q05_min"] = min(_number(layer["margin_q05"]) for layer in layers)
    metrics["infeasible_fraction"] = statistics.fmean(
        _number(layer["infeasible_fraction"]) for layer in layers)
    metrics["support_count"] = float(sum(layer["support_threshold_count"] for layer in layers))
    metrics["support_fraction"] = metrics["support_count"] / (
        results["margins"]["num_tokens"] * len(layers))
    metrics["train_wall_s"] = _number(train_summary.get("wall_s"))
    metrics["tokens_per_s"] = _number(train_summary.get("tokens_per_s"))
    return metrics


def aggregate(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (ddof = 1; None for one value) and n of the numbers."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers)}


def _settings(config: dict) -> dict:
    return {**{key: config.get(key) for key in CONFIG_KEYS},
            **{f"objective.{key}": config.get("objective", {}).get(key) for key in OBJECTIVE_KEYS},
            **{f"model.{key}": config.get("model", {}).get(key) for key in MODEL_KEYS}}


def collect_runs(experiment: Experiment, experiment_dir: Path) -> list[dict]:
    """Every finished and evaluated (run, seed) under ``experiment_dir/runs``, in run order."""
    found = []
    for run in experiment.runs:
        folders = [p for p in (experiment_dir / "runs" / run.name).glob("seed*")
                   if p.name[4:].isdigit()]
        for folder in sorted(folders, key=lambda p: int(p.name[4:])):
            summary = files.read_json_or_none(folder / SUMMARY_FILE) or {}
            results = files.read_json_or_none(folder / RESULTS_FILE) or {}
            config = upgrade_config(files.read_json_or_none(folder / CONFIG_FILE) or {})
            if summary.get("status") != "finished" or results.get("step") != summary.get("step"):
                continue
            found.append({"run": run.name, "seed": config.get("seed"), "step": summary["step"],
                          "workdir": folder.relative_to(experiment_dir).as_posix(),
                          "settings": _settings(config),
                          "margin_settings": {key: results["margins"][key] for key in
                                              ("tau", "bottom_k", "num_windows", "num_tokens")},
                          "metrics": headline_metrics(results, summary)})
    return found


def aggregate_variants(runs: list[dict]) -> dict[str, dict]:
    """Per run name: seeds, n, its objective settings and each metric's mean/std/n."""
    variants = {}
    for name in dict.fromkeys(run["run"] for run in runs):
        members = [run for run in runs if run["run"] == name]
        keys = dict.fromkeys(key for run in members for key in run["metrics"])
        variants[name] = {
            "n": len(members), "seeds": [run["seed"] for run in members],
            "settings": {key: value for key, value in members[0]["settings"].items()
                         if key.startswith("objective.")},
            "metrics": {key: aggregate([run["metrics"].get(key) for run in members])
                        for key in keys},
        }
    return variants


def inconsistent_settings(runs: list[dict]) -> list[str]:
    """Settings other than the objective and seed that differ between runs (should be none)."""
    keys = [key for key in (runs[0]["settings"] if runs else {})
            if not key.startswith("objective.") and key != "seed"]
    return [key for key in keys if len({json.dumps(run["settings"][key]) for run in runs}) > 1]


def evaluate_claims(experiment: Experiment, variants: dict[str, dict]) -> list[dict]:
    """The four verdicts, from the variant means (see ``stm_jax.claims`` for the criteria)."""
    def stat(run: str, metric: str) -> dict | None:
        return variants.get(run, {}).get("metrics", {}).get(metric)

    noisy = f"{claims.NOISE_MODE}_{claims.SIGMA:g}"
    sweep = {variants[run.name]["settings"]["objective.lambda_m"]: stat(run.name, f"bpc_{noisy}")
             for run in experiment.runs if run.in_lambda_sweep and run.name in variants}
    return [
        claims.clean_cost(stat(CE_RUN, "val_bpc"), stat(BARRIER_RUN, "val_bpc")),
        claims.robustness_gain(stat(CE_RUN, f"accuracy_{noisy}"),
                               stat(BARRIER_RUN, f"accuracy_{noisy}")),
        claims.lambda_optimum(sweep),
        claims.margin_geometry(stat(CE_RUN, "margin_q05_min"), stat(BARRIER_RUN, "margin_q05_min"),
                               stat(CE_RUN, "infeasible_fraction"),
                               stat(BARRIER_RUN, "infeasible_fraction")),
    ]


def build_summary(experiment: Experiment, experiment_dir: Path, invocations: list[dict]) -> dict:
    runs = collect_runs(experiment, experiment_dir)
    variants = aggregate_variants(runs)
    return {
        "experiment": experiment.name, "description": experiment.description,
        "data": {"description": experiment.data.description,
                 "caption_note": experiment.data.caption_note},
        "defaults": dict(experiment.defaults), "invocations": invocations,
        "std": "sample standard deviation over seeds (ddof = 1); null for one seed",
        "runs": runs, "variants": variants, "inconsistent_settings": inconsistent_settings(runs),
        "lambda_sweep": [run.name for run in experiment.runs if run.in_lambda_sweep],
        "paper": claims.PAPER, "claims": evaluate_claims(experiment, variants),
    }
