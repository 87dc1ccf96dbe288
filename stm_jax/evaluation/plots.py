"""The evaluation's figures: BPC against the noise scale, and the margin histograms.

Each function returns a matplotlib ``Figure`` drawn with the object-oriented API (Agg), never
pyplot's global state; ``files.write_png`` saves it.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def plot_bpc_vs_sigma(results: dict) -> Figure:
    """Bits per character (token) against sigma, one line per split and noise mode."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    bits = results["settings"]["bits"]
    for split, split_results in results["splits"].items():
        for mode, rows in split_results["robustness"].items():
            axes.plot([r["sigma"] for r in rows], [r[bits] for r in rows], marker="o",
                      linestyle="-" if split == "validation" else "--", label=f"{split}, {mode}")
    unit = "character" if bits == "bpc" else "token"
    axes.set(xlabel="embedding noise sigma", ylabel=f"bits per {unit}",
             title=f"Bits per {unit} under embedding noise (step {results['step']})")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def plot_margin_hist(margin: np.ndarray, sign: np.ndarray, tau: float, step: int) -> Figure:
    """One histogram of m_t per layer on its own range; tau is drawn where it falls inside."""
    num_layers = margin.shape[0]
    figure = Figure(figsize=(6, 2.2 * num_layers), layout="constrained")
    axes = np.atleast_1d(figure.subplots(num_layers, 1))
    for layer, ax in enumerate(axes):
        values = margin[layer].ravel()
        infeasible = float(np.mean(sign[layer] <= 0))
        below = int(np.sum(values <= tau))
        ax.hist(values, bins=50, color="tab:blue")
        if values.min() <= tau <= values.max():
            ax.axvline(tau, color="tab:red", linestyle="--", label=f"tau = {tau:g}")
            ax.legend(fontsize=8)
        ax.set_title(f"layer {layer}: {values.size} tokens, {below} with m_t <= tau = {tau:g}, "
                     f"infeasible {infeasible:.1%}", fontsize=9)
        ax.set_ylabel("tokens")
    axes[-1].set_xlabel("margin to degeneracy m_t = sigma_min(J_t)")
    figure.suptitle(f"Margins to degeneracy (step {step})")
    return figure
