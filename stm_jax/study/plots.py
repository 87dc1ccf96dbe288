"""The study's figures: BPC under noise, the lambda_m sweep, margins CE-only vs barrier.

Each function reads the summary (and, for margins, each run's ``margins.npz``) and returns a
matplotlib ``Figure`` or None when the runs it needs are missing; ``write_plots`` saves them
as PNG. Rendering uses the object-oriented API (Agg), never pyplot's global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from stm_jax import files
from stm_jax.data import VOCAB_FILENAME, Vocab
from stm_jax.evaluation import MARGINS_FILE
from stm_jax.study import claims
from stm_jax.study.experiments import BARRIER_RUN, CE_RUN, Experiment

BPC_PLOT, SWEEP_PLOT = "bpc_vs_sigma.png", "lambda_sweep.png"
MARGIN_PLOT, SUPPORT_PLOT = "margin_hist.png", "support_tokens.png"
QUALITY_PLOT = "robustness_vs_clean.png"
GRID_COLUMNS = 64
_VISIBLE = {"\n": "\u21b5", "\t": "\u2192", " ": "\u00b7"}


def _curve(metrics: dict, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, means, stds) of the metrics named ``prefix<sigma>``."""
    points = sorted((float(key[len(prefix):]), stat) for key, stat in metrics.items()
                    if key.startswith(prefix) and stat["mean"] is not None)
    sigmas = np.array([sigma for sigma, _ in points])
    means = np.array([stat["mean"] for _, stat in points])
    stds = np.array([stat["std"] or 0.0 for _, stat in points])
    return sigmas, means, stds


def plot_bpc_vs_sigma(summary: dict) -> Figure | None:
    """Validation BPC against the noise scale, one line per variant, +-1 std band over seeds."""
    if not summary["variants"]:
        return None
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    for axes, mode in zip(figure.subplots(1, 2, sharey=True), ("absolute", "relative"),
                          strict=True):
        for name, variant in summary["variants"].items():
            sigmas, means, stds = _curve(variant["metrics"], f"bpc_{mode}_")
            line, = axes.plot(sigmas, means, marker="o", markersize=3,
                              label=f"{name} (n={variant['n']})")
            axes.fill_between(sigmas, means - stds, means + stds, color=line.get_color(),
                              alpha=0.15)
        axes.set(title=f"{mode} noise", xlabel="embedding noise sigma")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("validation bits per character")
    figure.axes[1].legend(fontsize=7)
    figure.suptitle(f"{summary['experiment']}: BPC under embedding noise (mean +- std over seeds)")
    return figure


def plot_lambda_sweep(summary: dict, experiment: Experiment) -> Figure | None:
    """Clean and sigma = 0.5 BPC against lambda_m (log axis); CE-only as a dashed reference."""
    sweep = [(variant["settings"]["objective.lambda_m"], variant["metrics"])
             for run in experiment.runs if run.in_lambda_sweep
             and (variant := summary["variants"].get(run.name))]
    if not sweep:
        return None
    sweep.sort(key=lambda item: item[0])
    noisy = f"bpc_{claims.NOISE_MODE}_{claims.SIGMA:g}"
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, key, title in zip(figure.subplots(1, 2), ("val_bpc", noisy),
                                ("clean", f"{claims.NOISE_MODE} noise, sigma = {claims.SIGMA:g}"),
                                strict=True):
        lambdas = [lam for lam, _ in sweep]
        stats = [metrics[key] for _, metrics in sweep]
        axes.errorbar(lambdas, [s["mean"] for s in stats], yerr=[s["std"] or 0 for s in stats],
                      marker="o", capsize=3, label="margin (barrier)")
        reference = summary["variants"].get(CE_RUN, {}).get("metrics", {}).get(key)
        if reference and reference["mean"] is not None:
            axes.axhline(reference["mean"], color="gray", linestyle="--", label="CE only")
            spread = reference["std"] or 0.0
            axes.axhspan(reference["mean"] - spread, reference["mean"] + spread, color="gray",
                         alpha=0.15)
        axes.set(xscale="log", xlabel="lambda_m", ylabel="validation BPC", title=title)
        axes.ticklabel_format(axis="y", useOffset=False)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"{summary['experiment']}: the lambda_m sweep (mean +- std over seeds)")
    return figure


def _margins(experiment_dir: Path, summary: dict, run: str) -> list[dict]:
    """Each evaluated seed's margins.npz of ``run`` (seed order), as dicts of arrays."""
    loaded = []
    for record in summary["runs"]:
        path = experiment_dir / record["workdir"] / MARGINS_FILE
        if record["run"] == run and path.is_file():
            with np.load(path) as saved:
                loaded.append({key: saved[key] for key in saved.files}
                              | {"workdir": experiment_dir / record["workdir"]})
    return loaded


def plot_margin_hist(experiment_dir: Path, summary: dict) -> Figure | None:
    """Margins of layer 0 and of every layer, CE-only against the barrier, pooled over seeds."""
    runs = {name: _margins(experiment_dir, summary, name) for name in (CE_RUN, BARRIER_RUN)}
    if not all(runs.values()):
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, layers, title in zip(figure.subplots(1, 2), (slice(0, 1), slice(None)),
                                   ("layer 0", "all layers"), strict=True):
        pooled = {name: np.concatenate([m["margin"][layers].ravel() for m in loaded])
                  for name, loaded in runs.items()}
        edges = np.histogram_bin_edges(np.concatenate(list(pooled.values())), bins=60)
        for name, values in pooled.items():
            axes.hist(values, bins=edges, histtype="step", density=True, linewidth=1.5,
                      label=f"{name}: min {values.min():.3f}, 5% {np.quantile(values, 0.05):.3f}")
        axes.set(title=title, xlabel="margin m_t = sigma_min(J_t)", ylabel="density")
        axes.legend(fontsize=8)
    figure.suptitle(f"{summary['experiment']}: margins to degeneracy, validation windows")
    return figure


def plot_support_tokens(experiment_dir: Path, summary: dict) -> Figure | None:
    """One validation window per model as a character grid coloured by its layer-0 margin.

    The window's bottom-k margins (k as evaluate.py used: its support tokens) are outlined in
    red. Uses the lowest seed of CE-only and of the barrier run.
    """
    models = {name: _margins(experiment_dir, summary, name) for name in (CE_RUN, BARRIER_RUN)}
    if not all(models.values()):
        return None
    bottom_k = summary["runs"][0]["margin_settings"]["bottom_k"]
    windows = {name: loaded[0] for name, loaded in models.items()}
    margins = np.stack([w["margin"][0, 0] for w in windows.values()])  # (models, T)
    num_tokens = margins.shape[1]
    columns = min(GRID_COLUMNS, num_tokens)
    rows = math.ceil(num_tokens / columns)
    low, high = float(margins.min()), float(margins.max()) or 1.0
    figure = Figure(figsize=(max(6.0, 0.2 * columns + 1.5), 0.35 * rows * len(windows) + 1.6),
                    layout="constrained")
    all_axes = figure.subplots(len(windows), 1, squeeze=False)[:, 0]
    image = None
    for axes, (name, window), values in zip(all_axes, windows.items(), margins, strict=True):
        text = Vocab.load(window["workdir"] / VOCAB_FILENAME).decode(window["inputs"][0])
        support = set(np.argsort(values, kind="stable")[:bottom_k].tolist())
        image = axes.imshow(np.pad(values, (0, rows * columns - num_tokens),
                                   constant_values=np.nan).reshape(rows, columns),
                            cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for index, char in enumerate(text):
            row, column = divmod(index, columns)
            shade = (values[index] - low) / ((high - low) or 1.0)
            axes.text(column, row, _VISIBLE.get(char, char), ha="center", va="center",
                      fontsize=7, color="white" if shade < 0.5 else "black")
            if index in support:
                axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False,
                                         edgecolor="red", linewidth=1.5))
        axes.set(xticks=[], yticks=[])
        axes.set_title(name, fontsize=9)
    figure.colorbar(image, ax=list(all_axes), label="margin m_t", shrink=0.8)
    figure.suptitle(f"Layer-0 margins of validation window 0; red: its {bottom_k} smallest "
                    "(support tokens)", fontsize=9)
    return figure


def plot_quality_curve(summary: dict) -> Figure | None:
    """Top-1 under noise against clean BPC: CE-only's checkpoints as a curve, every variant as
    a point (mean over seeds). A point on the curve bought nothing but a worse clean BPC."""
    curve = summary.get("ce_curve") or []
    if len(curve) < 2:
        return None
    sigma = f"{claims.SIGMA:g}"
    figure = Figure(figsize=(12, 5), layout="constrained")
    readings = {run.get("reading", "") for run in summary.get("readings", [])}
    colours = {reading: f"C{index + 1}" for index, reading in enumerate(sorted(readings))}
    reading_of = {row["run"]: row["reading"] for row in summary.get("readings", [])}
    for axes, mode in zip(figure.subplots(1, 2), ("absolute", "relative"), strict=True):
        key = f"accuracy_{mode}_{sigma}"
        axes.plot([p["val_bpc"] for p in curve], [100 * p[key] for p in curve], "k-o",
                  markersize=3, label="CE-only checkpoints (quality curve)")
        for point in curve:
            axes.annotate(str(point["step"]), (point["val_bpc"], 100 * point[key]), fontsize=6)
        for name, variant in summary["variants"].items():
            clean, noisy = variant["metrics"].get("val_bpc"), variant["metrics"].get(key)
            if not clean or not noisy or clean["mean"] is None or noisy["mean"] is None:
                continue
            reading = reading_of.get(name, "")
            axes.plot(clean["mean"], 100 * noisy["mean"], "o", color=colours.get(reading, "C0"),
                      markersize=5)
            axes.annotate(name, (clean["mean"], 100 * noisy["mean"]), fontsize=5)
        axes.set(xlabel="clean validation BPC", ylabel=f"top-1 (%) at sigma = {sigma}",
                 title=f"{mode} noise")
        axes.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, marker="o", linestyle="", label=reading)
               for reading, colour in colours.items()]
    handles.append(Line2D([], [], color="C0", marker="o", linestyle="",
                          label="no reading (CE and the controls)"))
    figure.axes[0].legend(handles=[figure.axes[0].lines[0], *handles], fontsize=7)
    figure.suptitle(f"{summary['experiment']}: robustness against clean quality")
    return figure


def write_plots(experiment: Experiment, experiment_dir: Path, summary: dict) -> list[str]:
    """Saves every figure whose runs exist; returns the file names written."""
    figures = {
        BPC_PLOT: plot_bpc_vs_sigma(summary),
        SWEEP_PLOT: plot_lambda_sweep(summary, experiment),
        MARGIN_PLOT: plot_margin_hist(experiment_dir, summary),
        SUPPORT_PLOT: plot_support_tokens(experiment_dir, summary),
        QUALITY_PLOT: plot_quality_curve(summary),
    }
    written = []
    for name, figure in figures.items():
        if figure is not None:
            files.write_png(experiment_dir / name, figure)
            written.append(name)
    return written
