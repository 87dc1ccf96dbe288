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
from stm_jax.trainer.metrics import METRICS_FILE
from stm_jax.trainer.workdir import CONFIG_FILE, SUMMARY_FILE, upgrade_config

CONFIG_KEYS = ("num_steps", "batch_size", "seed")
OBJECTIVE_KEYS = ("variant", "lambda_m", "lambda_s", "layers", "scope", "barrier_fraction",
                  "barrier_step_fraction", "barrier_floor", "barrier_target", "prior_dim",
                  "penalty", "train_noise_sigma", "fixed_noise_scale")
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
    metrics.update(mechanism_metrics(results))
    return metrics


def mechanism_metrics(results: dict) -> dict[str, float | None]:
    """What evaluations since the readings study report (older results have none of these):
    the noised latent's RMS, absolute sigma in its units, per-layer noise gain and self-map
    spectra, the embedding prior's blocks."""
    metrics = {}
    clean = results["splits"]["validation"]["clean"]
    metrics["latent_rms"] = _number(clean.get("latent_rms"))
    for row in results["splits"]["validation"]["robustness"].get("absolute", []):
        if "sigma_in_rms" in row:
            metrics[f"sigma_in_rms_{row['sigma']:g}"] = _number(row["sigma_in_rms"])
    for layer in results["margins"]["layers"]:
        index, spectrum = layer["layer"], layer.get("spectrum")
        metrics[f"noise_gain_layer{index}"] = _number(layer.get("noise_gain"))
        if spectrum:
            metrics[f"spectral_radius_median_layer{index}"] = _number(
                spectrum["spectral_radius_quantiles"]["q50"])
            metrics[f"eig_real_above_one_layer{index}"] = _number(
                spectrum["fraction_real_above_one"])
    prior = results["margins"].get("prior")
    if prior:
        metrics["prior_logdet_median"] = _number(prior["logdet_quantiles"]["q50"])
        metrics["prior_margin_min"] = _number(prior["margin_quantiles"]["q00"])
        metrics["prior_infeasible_fraction"] = _number(prior["infeasible_fraction"])
    return metrics


def constraint_metrics(folder: Path) -> dict[str, float | None]:
    """From training's last validation record: the fraction of blocks at a bounded penalty's
    constraint (a margin below tau, a gain past the knee, a capped log-det); None without one."""
    last = None
    path = folder / METRICS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("split") == "validation":
                last = record
    return {"active_fraction": _number((last or {}).get("active_fraction"))}


def curve_points(folder: Path) -> list[dict]:
    """A curve run's earlier checkpoints (eval_results_step<N>.json), in step order."""
    points = []
    for path in folder.glob("eval_results_step*.json"):
        results = files.read_json_or_none(path)
        if results is None:
            continue
        validation = results["splits"]["validation"]
        point = {"step": results["step"], "val_bpc": _number(validation["clean"]["bpc"])}
        for mode, rows in validation["robustness"].items():
            for row in rows:
                point[f"accuracy_{mode}_{row['sigma']:g}"] = _number(row["accuracy"])
        points.append(point)
    return sorted(points, key=lambda point: point["step"])


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
                          "metrics": {**headline_metrics(results, summary),
                                      **constraint_metrics(folder)},
                          **({"curve": curve_points(folder)} if run.curve else {})})
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


READING_MODES = ("absolute", "relative")


def ce_curve(runs: list[dict]) -> list[dict]:
    """CE-only's quality curve: every curve point of its seeds and its final evaluation,
    averaged over seeds at each step."""
    by_step: dict[int, list[dict]] = {}
    for run in runs:
        if run["run"] != CE_RUN or "curve" not in run:
            continue
        final = {"step": run["step"], **run["metrics"]}
        for point in [*run["curve"], final]:
            by_step.setdefault(point["step"], []).append(point)
    keys = ["val_bpc"] + [f"accuracy_{mode}_{claims.SIGMA:g}" for mode in READING_MODES]
    return [{"step": step, "n": len(points),
             **{key: statistics.fmean(p[key] for p in points) for key in keys}}
            for step, points in sorted(by_step.items())]


def evaluate_readings(experiment: Experiment, variants: dict[str, dict],
                      curve: list[dict]) -> list[dict]:
    """One verdict per reading run and noise mode (``claims.reading_verdict``), with its clean
    cost, its gains over CE-only and its control, and its gain over the CE quality curve."""
    def stat(run: str, metric: str) -> dict | None:
        return variants.get(run, {}).get("metrics", {}).get(metric)

    verdicts = []
    for run in experiment.runs:
        if not run.reading or run.name not in variants:
            continue
        control = run.control or CE_RUN
        for mode in READING_MODES:
            noisy = f"accuracy_{mode}_{claims.SIGMA:g}"
            verdict = claims.reading_verdict(
                stat(CE_RUN, "val_bpc"), stat(run.name, "val_bpc"), stat(CE_RUN, noisy),
                stat(run.name, noisy), stat(control, noisy), control == CE_RUN)
            reading = stat(run.name, noisy) or {}
            clean = stat(run.name, "val_bpc") or {}
            matched = claims.quality_matched_gain(
                [(point["val_bpc"], point[noisy]) for point in curve], clean.get("mean"),
                reading.get("mean"))
            verdicts.append({"reading": run.reading, "run": run.name, "control": control,
                             "mode": mode, "n": variants[run.name]["n"],
                             "quality_matched_gain_points": matched, **verdict})
    return verdicts


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
        **readings_summary(experiment, variants, runs),
    }


def readings_summary(experiment: Experiment, variants: dict, runs: list[dict]) -> dict:
    """The readings study's part: the CE quality curve and the verdicts (none elsewhere)."""
    if not any(run.reading for run in experiment.runs):
        return {}
    curve = ce_curve(runs)
    return {"ce_curve": curve, "readings": evaluate_readings(experiment, variants, curve),
            "reading_criterion": claims.READING_CRITERION}
