"""``analysis.md`` and the figures of ``analyze``: pure formatting of its results dict (every
number is also in ``analysis.json``)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from stm_jax.evaluation.report import visible


def _row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _shown(piece: str) -> str:
    return "`" + (visible(piece) or "\u25ab").replace("`", "'") + "`"


def format_report(results: dict) -> str:
    settings, model = results["settings"], results["model"]
    scope = settings["scope"]
    margin_of = ("sigma_min(J_t), the exact layer block" if scope == "layer" else
                 "the smallest of its heads' sigma_min(I - W_O^h G_t^h)")
    summed, where = (", summed over heads", " in some head") if scope == "head" else ("", "")
    lines = [
        f"# Margins and support tokens of {results['checkpoint']}", "",
        f"Model: {model['num_layers']} layers, {model['num_heads']} heads, d = "
        f"{model['d_model']}, context {model['context']}, vocabulary {model['vocab_size']}. "
        f"Text: the first {results['num_tokens']} tokens of {results['text_file']} "
        f"({results['tokenizer']}), in windows of {settings['windows']} tokens.", "",
        f"Scope: {scope}. A token's margin is {margin_of}; its barrier is the smooth "
        f"-log det (eps = {settings['barrier_eps']:g}){summed}; infeasible means det <= 0"
        f"{where}. Support tokens: the "
        f"{settings['bottom_k']} smallest margins of each window, and every margin <= tau = "
        f"{settings['tau']:g}.", "",
        "## Per layer", "",
        _row(["layer", "margin min", "5%", "median", "95%", "infeasible", "barrier mean",
              "barrier max", "support tokens"]),
        "|---" * 9 + "|",
    ]
    for layer in results["layers"]:
        q, b = layer["margin_quantiles"], layer["barrier_quantiles"]
        lines.append(_row([layer["layer"], f"{q['q00']:.4g}", f"{q['q05']:.4g}",
                           f"{q['q50']:.4g}", f"{q['q95']:.4g}",
                           f"{layer['infeasible_fraction']:.1%}", f"{layer['barrier_mean']:.4g}",
                           f"{b['q100']:.4g}", len(layer["support"])]))
    lines += ["", "## Support tokens (smallest margins first)", ""]
    tokens = results["tokens"]
    for layer in results["layers"]:
        margin = layer["margin"]
        ranked = sorted(layer["support"], key=lambda i, m=margin: m[i])[:12]
        listed = ", ".join(f"{_shown(tokens[i])}@{i} {margin[i]:.3g}" for i in ranked)
        more = len(layer["support"]) - len(ranked)
        lines.append(f"* layer {layer['layer']}: {listed}" + (f" and {more} more" if more
                                                               else ""))
    lines += ["", "## Per head", "",
              _row(["layer", "head", "margin min", "5%", "median", "log-det median",
                    "infeasible", "barrier mean", "support tokens"]), "|---" * 9 + "|"]
    for layer in results["layers"]:
        for head in layer["heads"]:
            q, d = head["margin_quantiles"], head["logdet_quantiles"]
            lines.append(_row([layer["layer"], head["head"], f"{q['q00']:.4g}",
                               f"{q['q05']:.4g}", f"{q['q50']:.4g}", f"{d['q50']:.4g}",
                               f"{head['infeasible_fraction']:.1%}",
                               f"{head['barrier_mean']:.4g}", len(head["support"])]))
    lines += ["", "Files: `analysis.json` (every number), `analysis.npz` (per-head arrays), "
              "`analysis.html` (the text with each layer's support tokens), `margins.png`, "
              "`head_margins.png`.", ""]
    return "\n".join(lines)


def plot_margins(results: dict) -> Figure:
    """Each layer's token margins (box: quartiles, whiskers: 5-95%), log scale."""
    layers = results["layers"]
    figure = Figure(figsize=(max(5.0, 0.5 * len(layers) + 2), 3.8), layout="constrained")
    axes = figure.subplots()
    margins = [np.maximum(np.asarray(layer["margin"]), 1e-12) for layer in layers]
    axes.boxplot(margins, whis=(5, 95), showfliers=False)
    axes.set_xticks(range(1, len(layers) + 1), [str(layer["layer"]) for layer in layers])
    axes.set_yscale("log")
    axes.axhline(results["settings"]["tau"], color="tab:red", linestyle="--",
                 label=f"tau = {results['settings']['tau']:g}")
    axes.set(xlabel="layer", ylabel="margin m_t",
             title=f"Margins to degeneracy ({results['settings']['scope']} scope, "
                   f"{results['num_tokens']} tokens)")
    axes.legend(fontsize=8)
    return figure


def plot_head_margins(results: dict) -> Figure:
    """Median and 5% head margins as layer x head maps."""
    layers = results["layers"]
    figure = Figure(figsize=(9, 0.35 * len(layers) + 2.2), layout="constrained")
    for axes, key, name in zip(figure.subplots(1, 2), ("q50", "q05"), ("median", "5%"),
                               strict=True):
        grid = np.array([[head["margin_quantiles"][key] for head in layer["heads"]]
                         for layer in layers])
        image = axes.imshow(grid, aspect="auto", cmap="viridis")
        axes.set(xlabel="head", ylabel="layer", title=f"{name} head margin")
        figure.colorbar(image, ax=axes)
    return figure
