"""``report.md`` of a study: setup, the verdicts, one table per question, plots, discussion.

Pure formatting of ``summary.json`` (``stm_jax.reproduce_summary``): every number in the report
is in the summary too. Means are followed by +- the sample standard deviation over seeds.
"""

from __future__ import annotations

from stm_jax.study import claims
from stm_jax.study.claims import PAPER
from stm_jax.study.experiments import BARRIER_RUN, CE_RUN
from stm_jax.trainer.metrics import format_duration

NOISY = f"{claims.NOISE_MODE}_{claims.SIGMA:g}"
_CLAIM_TITLES = {
    "clean_cost": "Clean cost: margin_0.02 vs CE-only validation BPC, relative",
    "robustness": f"Robustness: top-1 gain at sigma = {claims.SIGMA:g} ({claims.NOISE_MODE} "
                  "noise), barrier minus CE-only, points",
    "lambda_optimum": f"lambda_m minimising BPC at sigma = {claims.SIGMA:g}",
    "margin_geometry": "Margins: worst layer's 5% margin, barrier minus CE-only",
}


def mean_std(stat: dict | None, digits: int = 4, scale: float = 1.0) -> str:
    """``2.7431 +- 0.0123``; only the mean for one seed; ``-`` when missing."""
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat.get("std") is None else f"{text} \u00b1 {stat['std'] * scale:.{digits}f}"


def _stat(summary: dict, run: str, metric: str) -> dict | None:
    return summary["variants"].get(run, {}).get("metrics", {}).get(metric)


def _mean(summary: dict, run: str, metric: str) -> float | None:
    stat = _stat(summary, run, metric)
    return None if stat is None else stat["mean"]


def _relative(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{(value - reference) / reference:+.2%}"


def _points(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{100 * (value - reference):+.1f}"


class _Tables:
    """Numbered captions, each with the data note (e.g. the WikiText proxy split)."""

    def __init__(self, note: str):
        self.note, self.count = note, 0

    def caption(self, text: str) -> str:
        self.count += 1
        note = f" Data: {self.note}." if self.note else ""
        return f"*Table {self.count}. {text}{note}*"


def _spread(claim: dict) -> str:
    if claim.get("within_seed_noise") is None:
        return "unknown (one seed)" if claim["verdict"] != "not run" else "-"
    se = claim["standard_error"]
    where = "within" if claim["within_seed_noise"] else "beyond"
    return f"{where} seed noise (difference {claim['difference']:+.4g}, SE {se:.2g})"


def _measured(claim: dict) -> str:
    value = claim.get("measured")
    if value is None:
        return claim.get("note", "-")
    return {"clean_cost": f"{value:+.2%}", "robustness": f"{value:+.1f} points",
            "lambda_optimum": f"{value:g}",
            "margin_geometry": f"{value:+.4f} (infeasible fraction "
                               f"{claim.get('infeasible_difference', 0):+.2%})"}[claim["claim"]]


def _paper(claim: dict) -> str:
    paper = claim.get("paper")
    if paper is None:
        return "qualitative"
    return {"clean_cost": f"+{paper:.1%}", "robustness": f"+{paper:g} points",
            "lambda_optimum": f"{paper:g}"}.get(claim["claim"], str(paper))


def verdict_section(summary: dict, tables: _Tables) -> list[str]:
    lines = ["## Verdicts", "", "| claim | criterion | measured | paper | seed spread | verdict |",
             "|---|---|---|---|---|---|"]
    for claim in summary["claims"]:
        lines.append(f"| {_CLAIM_TITLES[claim['claim']]} | {claim['criterion']} | "
                     f"{_measured(claim)} | {_paper(claim)} | {_spread(claim)} | "
                     f"**{claim['verdict']}** |")
    lines += ["", tables.caption(f"One verdict per claim of the paper; seed noise = "
                                 f"{claims.NOISE_Z:g} standard errors of the difference."), ""]
    return lines


def clean_section(summary: dict, tables: _Tables) -> list[str]:
    ce = _mean(summary, CE_RUN, "val_bpc")
    paper = {CE_RUN: claims.PAPER["ce_clean_bpc"], BARRIER_RUN: claims.PAPER["margin_clean_bpc"]}
    lines = ["## Clean cost", "", "| variant | lambda_m | n | validation BPC | top-1 (%) | "
             "vs CE-only | paper BPC |", "|---|---|---|---|---|---|---|"]
    for name, variant in summary["variants"].items():
        lines.append(f"| {name} | {variant['settings']['objective.lambda_m']:g} | "
                     f"{variant['n']} | {mean_std(_stat(summary, name, 'val_bpc'))} | "
                     f"{mean_std(_stat(summary, name, 'val_accuracy'), 1, 100.0)} | "
                     f"{_relative(_mean(summary, name, 'val_bpc'), ce)} | "
                     f"{paper.get(name, '')} |")
    barrier = _mean(summary, BARRIER_RUN, "val_bpc")
    lines += ["", tables.caption("Clean validation BPC and top-1 accuracy, mean \u00b1 std over "
                                 "seeds."), "",
              f"Margin-only (lambda_m = 0.02) vs CE-only: "
              f"{'-' if barrier is None else f'{barrier:.4f}'} vs "
              f"{'-' if ce is None else f'{ce:.4f}'} BPC, relative difference "
              f"{_relative(barrier, ce)} (paper: CE {PAPER['ce_clean_bpc']}, margin "
              f"{PAPER['margin_clean_bpc']}, +{PAPER['clean_cost']:.1%}). Absolute BPC "
              "is not comparable with the paper's (other data and scale); the relative "
              "difference is.", ""]
    return lines


def robustness_section(summary: dict, tables: _Tables) -> list[str]:
    sigma = f"{claims.SIGMA:g}"
    lines = [f"## Robustness at sigma = {sigma}", "",
             "| variant | n | BPC (absolute) | top-1 (absolute) | top-1 vs CE (points) | "
             "BPC (relative) | top-1 (relative) | top-1 vs CE (points) |", "|---" * 8 + "|"]
    for name, variant in summary["variants"].items():
        cells = []
        for mode in ("absolute", "relative"):
            accuracy = _mean(summary, name, f"accuracy_{mode}_{sigma}")
            cells += [mean_std(_stat(summary, name, f"bpc_{mode}_{sigma}")),
                      mean_std(_stat(summary, name, f"accuracy_{mode}_{sigma}"), 1, 100.0),
                      _points(accuracy, _mean(summary, CE_RUN, f"accuracy_{mode}_{sigma}"))]
        lines.append(f"| {name} | {variant['n']} | " + " | ".join(cells) + " |")
    gain = {mode: _points(_mean(summary, BARRIER_RUN, f"accuracy_{mode}_{sigma}"),
                          _mean(summary, CE_RUN, f"accuracy_{mode}_{sigma}"))
            for mode in ("absolute", "relative")}
    lines += ["", tables.caption(f"Validation BPC and top-1 accuracy (%) with Gaussian noise of "
                                 f"scale {sigma} on the layer-0 embedding; relative: times "
                                 "each token's embedding RMS."), "",
              f"Barrier (lambda_m = 0.02) minus CE-only in top-1 accuracy at sigma = {sigma}: "
              f"{gain['absolute']} points with absolute noise, {gain['relative']} with relative "
              f"noise (paper: +{PAPER['accuracy_gain_points']:g} points).", ""]
    return lines


def sweep_section(summary: dict, tables: _Tables) -> list[str]:
    sweep = sorted((summary["variants"][name]["settings"]["objective.lambda_m"], name)
                   for name in summary["lambda_sweep"] if name in summary["variants"])
    claim = next(c for c in summary["claims"] if c["claim"] == "lambda_optimum")
    lines = ["## The lambda_m sweep", "", f"| lambda_m | run | n | clean BPC | BPC at sigma = "
             f"{claims.SIGMA:g} | top-1 at sigma = {claims.SIGMA:g} |", "|---|---|---|---|---|---|"]
    for lam, name in ([(0.0, CE_RUN)] if CE_RUN in summary["variants"] else []) + sweep:
        best = "**" if claim.get("measured") == lam and name != CE_RUN else ""
        lines.append(f"| {lam:g} | {name} | {summary['variants'][name]['n']} | "
                     f"{mean_std(_stat(summary, name, 'val_bpc'))} | "
                     f"{best}{mean_std(_stat(summary, name, f'bpc_{NOISY}'))}{best} | "
                     f"{mean_std(_stat(summary, name, f'accuracy_{NOISY}'), 1, 100.0)} |")
    best = claim.get("measured")
    lines += ["", tables.caption(f"Validation BPC against lambda_m ({claims.NOISE_MODE} noise; "
                                 "CE-only as lambda_m = 0); bold: the minimum under noise."), "",
              f"lambda_m minimising BPC at sigma = {claims.SIGMA:g}: "
              f"{'not determined' if best is None else f'{best:g}'} "
              f"(paper: {PAPER['best_lambda_m']:g}).", ""]
    return lines


def margin_section(summary: dict, tables: _Tables) -> list[str]:
    settings = summary["runs"][0]["margin_settings"] if summary["runs"] else {}
    lines = ["## Margin geometry", "",
             "| variant | n | min, layer 0 | 5%, layer 0 | min, all layers | worst layer's 5% | "
             "infeasible fraction | support tokens (m_t <= tau), all layers | at the penalty's "
             "constraint |", "|---" * 9 + "|"]
    for name, variant in summary["variants"].items():
        lines.append(f"| {name} | {variant['n']} | "
                     + " | ".join(mean_std(_stat(summary, name, metric)) for metric in (
                         "margin_min_layer0", "margin_q05_layer0", "margin_min",
                         "margin_q05_min"))
                     + f" | {mean_std(_stat(summary, name, 'infeasible_fraction'), 2, 100.0)}% | "
                     f"{mean_std(_stat(summary, name, 'support_count'), 1)} | "
                     f"{_percent(_stat(summary, name, 'active_fraction'))} |")
    lines += ["", tables.caption(
        f"Margins m_t = sigma_min(J_t) on {settings.get('num_windows', '?')} validation windows "
        f"({settings.get('num_tokens', '?')} tokens per layer); infeasible: det J_t <= 0 (%); "
        f"support tokens: m_t <= tau = {settings.get('tau', '?')}, summed over layers; at the "
        "constraint: the blocks where a bounded penalty acts (margin below tau, gain past the "
        "knee, log-det capped; %), from training's last validation pass, - without one."), ""]
    return lines


def _percent(stat: dict | None) -> str:
    text = mean_std(stat, 2, 100.0)
    return text if text == "-" else f"{text}%"


def _signed(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:+.{digits}f}{suffix}"


def readings_section(summary: dict, tables: _Tables) -> list[str]:
    """The readings study's verdicts: one row per reading run and noise mode."""
    if "readings" not in summary:
        return []
    sigma = f"{claims.SIGMA:g}"
    lines = ["## Readings: which, if any, recovers the robustness claim", "",
             f"Criterion: {summary['reading_criterion']}.", "",
             f"| reading | run | n | clean BPC | cost vs CE | noise | top-1 vs CE (points "
             f"\u00b1 SE) | vs its control | vs the CE quality curve | sigma = {sigma} in "
             "latent RMS | verdict |", "|---" * 11 + "|"]
    for row in summary["readings"]:
        if row["verdict"] == "not run":
            continue
        gain = _signed(row["gain_points"])
        if row.get("gain_se_points") is not None:
            gain += f" \u00b1 {row['gain_se_points']:.1f}"
        control = ("-" if row["control"] == CE_RUN else
                   f"{_signed(row['gain_over_control_points'])} ({row['control']})")
        in_rms = _stat(summary, row["run"], f"sigma_in_rms_{sigma}")
        lines.append(
            f"| {row['reading']} | {row['run']} | {row['n']} | "
            f"{mean_std(_stat(summary, row['run'], 'val_bpc'))} | "
            f"{_signed(100 * row['clean_cost'], 1, '%')} | {row['mode']} | {gain} | {control} | "
            f"{_signed(row['quality_matched_gain_points'])} | "
            f"{'-' if row['mode'] != 'absolute' else mean_std(in_rms, 2)} | "
            f"**{row['verdict']}** |")
    lines += ["", tables.caption(
        f"Each reading against CE-only and its control, top-1 accuracy at sigma = {sigma} "
        "(absolute: on the embedding as it is; relative: times each token's RMS). The CE "
        "quality curve interpolates CE-only's checkpoints at the run's clean BPC (- outside "
        "its range): a run on the curve bought nothing but a worse clean BPC."), ""]
    return lines


def mechanism_section(summary: dict, tables: _Tables) -> list[str]:
    """Per-layer noise gain and self-map spectra, and the embedding's scale, per variant."""
    if "readings" not in summary or not summary["runs"]:
        return []
    layers = sorted({int(key.removeprefix("noise_gain_layer")) for run in summary["runs"]
                     for key in run["metrics"] if key.startswith("noise_gain_layer")})
    if not layers:
        return []
    lines = ["## Mechanism: noise gain, self-map spectra, embedding scale", "",
             "| variant | n | latent RMS | " + " | ".join(f"gain L{i}" for i in layers) + " | "
             + " | ".join(f"radius L{i}" for i in layers) + " | Re(lambda) > 1, worst layer |",
             "|---" * (4 + 2 * len(layers)) + "|"]
    for name, variant in summary["variants"].items():
        above = [_mean(summary, name, f"eig_real_above_one_layer{i}") for i in layers]
        above = [value for value in above if value is not None]
        lines.append(
            f"| {name} | {variant['n']} | {mean_std(_stat(summary, name, 'latent_rms'), 3)} | "
            + " | ".join(mean_std(_stat(summary, name, f"noise_gain_layer{i}"), 2)
                         for i in layers) + " | "
            + " | ".join(mean_std(_stat(summary, name, f"spectral_radius_median_layer{i}"), 2)
                         for i in layers)
            + f" | {'-' if not above else f'{100 * max(above):.1f}%'} |")
    lines += ["", tables.caption(
        "Latent RMS: the validation embedding's RMS. Noise gain: ||x^l(x0 + delta) - x^l(x0)|| "
        "/ ||delta|| after layer l for delta of 1% of each token's RMS. Radius: median "
        "spectral radius of the self-maps M_t = I - J_t. Last column: tokens with an "
        "eigenvalue of M_t of real part above 1, in the worst layer."), ""]
    return lines


def cost_section(summary: dict, tables: _Tables) -> list[str]:
    lines = ["## Training cost and every run", "", "| run | seed | step | validation BPC | "
             f"top-1 at sigma = {claims.SIGMA:g} | wall time | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        metrics = run["metrics"]
        tokens = metrics.get("tokens_per_s")
        lines.append(f"| {run['run']} | {run['seed']} | {run['step']} | {metrics['val_bpc']:.4f} "
                     f"| {100 * metrics[f'accuracy_{NOISY}']:.1f}% | "
                     f"{format_duration(metrics.get('train_wall_s'))} | "
                     f"{'-' if tokens is None else f'{tokens:,.0f}'} |")
    lines += ["", tables.caption(f"Each run ({claims.NOISE_MODE} noise). Wall time: the training "
                                 "loop and its final evaluation, compilation excluded; for a "
                                 "resumed run, its last session only."), ""]
    return lines


def setup_section(summary: dict) -> list[str]:
    if not summary["runs"]:
        return ["## Setup", "", "No finished run yet.", ""]
    invocations = summary["invocations"]
    commands = list(dict.fromkeys(i["command"] for i in invocations)) or ["(not recorded)"]
    environments = list(dict.fromkeys(_environment_line(i["environment"]) for i in invocations))
    seeds = {name: variant["seeds"] for name, variant in summary["variants"].items()}
    seed_text = ("; ".join(f"{name}: {values}" for name, values in seeds.items())
                 if len({str(v) for v in seeds.values()}) > 1
                 else f"{next(iter(seeds.values()))} for every variant")
    run = summary["runs"][0]["settings"]
    lines = ["## Setup", "", "Commands that trained and evaluated these runs:", "", "```",
             *commands, "```", "",
             f"* Seeds: {seed_text}.",
             f"* Data: {summary['data']['description']}.",
             f"* Model and schedule: layers {run.get('model.num_layers')}, heads "
             f"{run.get('model.num_heads')}, d = {run.get('model.d_model')}, context "
             f"{run.get('model.context')}, batch {run.get('batch_size')}, steps "
             f"{run.get('num_steps')}.",
             f"* Experiment defaults: {summary['defaults'] or 'none'}.",
             *(f"* Software and hardware: {line}." for line in environments),
             f"* Statistics: mean \u00b1 {summary['std']}.", ""]
    if summary["inconsistent_settings"]:
        lines += [f"**Warning:** the runs differ in {', '.join(summary['inconsistent_settings'])}"
                  " (beyond the objective and seed); compare them with care.", ""]
    return lines


def _environment_line(environment: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in environment["versions"].items())
    hardware = environment["hardware"]
    return (f"{versions}; devices {hardware['devices']} (backend {hardware['backend']}); CPU "
            f"{hardware['cpu']}, {hardware['cpu_count']} cores")


def format_report(summary: dict, plots: list[str], notes: str | None) -> str:
    tables = _Tables(summary["data"]["caption_note"])
    lines = [f"# Reproduction study: {summary['experiment']}", "",
             f"{summary['description']}. Regenerate this report with `python "
             f"scripts/reproduce.py --experiment={summary['experiment']} --report_only`; all "
             "numbers are in `summary.json`.", ""]
    if summary["data"]["caption_note"]:
        lines += [f"**Data: {summary['data']['caption_note']}.**", ""]
    lines += setup_section(summary)
    for section in (verdict_section, readings_section, clean_section, robustness_section,
                    sweep_section, margin_section, mechanism_section, cost_section):
        lines += section(summary, tables)
    if plots:
        lines += ["## Plots", "", *(f"![{name}]({name})" for name in plots), ""]
    if notes is not None:
        lines += ["## Discussion", "", notes.rstrip(), ""]
    return "\n".join(lines)
