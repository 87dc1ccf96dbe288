"""``eval_report.md``: the evaluation's results as a person reads them first.

Pure formatting of the results dict ``evaluate_workdir`` returns: every number is also in
``eval_results.json``.
"""

from __future__ import annotations

from stm_jax.evaluation import BPC_PLOT, MARGIN_PLOT, RESULTS_FILE

# How characters that would break the column alignment of the support-token display are shown.
_VISIBLE = {"\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}


def visible(text: str) -> str:
    """One column per character, so marker lines line up under the text."""
    return "".join(_VISIBLE.get(c, c if c.isprintable() else "\u00b7") for c in text)


def _marker_line(layer: dict, length: int) -> str:
    marks = [" "] * length
    for index in layer["bottom_k"]:
        marks[index] = "^"
    for index in layer["below_tau"]:
        marks[index] = "*"
    for index in layer["infeasible"]:
        marks[index] = "!"
    return "".join(marks).rstrip()


def _robustness_table(rows_by_mode: dict, bits: str, clean_bits: float) -> list[str]:
    """Bits (``bits``: per character or per token) and top-1 per sigma and mode; the ratio to
    the clean top-1 stands next to the clean bits it depends on (a worse clean model loses
    less to noise), and absolute sigma is also given in units of the noised latent's RMS."""
    modes = list(rows_by_mode)
    name = "BPC" if bits == "bpc" else "bits/token"
    header = ("| sigma | " + " | ".join(f"{m} {name} | {m} top-1 | {m} top-1 / clean"
                                         for m in modes)
              + f" | clean {name} | absolute sigma / latent RMS |")
    lines = [header, "|---" * (3 + 3 * len(modes)) + "|"]
    for i, row in enumerate(rows_by_mode[modes[0]]):
        cells = [f"{rows_by_mode[m][i][bits]:.4f} | {rows_by_mode[m][i]['accuracy']:.3f} | "
                 f"{rows_by_mode[m][i]['accuracy_ratio']:.3f}" for m in modes]
        in_rms = rows_by_mode.get("absolute", [{}] * (i + 1))[i].get("sigma_in_rms")
        lines.append(f"| {row['sigma']:g} | " + " | ".join(cells) + f" | {clean_bits:.4f} | "
                     + ("-" if in_rms is None else f"{in_rms:.3g}") + " |")
    return lines


def _margin_section(margins: dict) -> list[str]:
    tau, k = margins["tau"], margins["bottom_k"]
    lines = [
        f"## Margins to degeneracy ({margins['split']}, {margins['num_windows']} windows, "
        f"{margins['num_tokens']} tokens per layer)", "",
        "m_t = sigma_min(J_t), the distance from the layer's Jacobian block to the nearest "
        "singular matrix. Infeasible: det J_t <= 0 (sign of the layer-scope log-det). Support "
        f"tokens: m_t <= tau = {tau:g}, and the bottom-{k} per window.", "",
        "| layer | min | 5% | 25% | median | 75% | 95% | max | infeasible | m_t <= tau | "
        f"bottom-{k} mean m_t |",
        "|---" * 11 + "|",
    ]
    for layer in margins["layers"]:
        q = layer["margin_quantiles"]
        lines.append(
            f"| {layer['layer']} | " + " | ".join(f"{q[key]:.4f}" for key in q)
            + f" | {layer['infeasible_fraction']:.2%} | {layer['support_threshold_count']} "
            f"({layer['support_threshold_fraction']:.1%}) | {layer['bottom_k_mean_margin']:.4f} |")
    lines += ["", "Barrier b_t = smooth -log det J_t per layer (quantiles):", "",
              "| layer | min | 5% | median | 95% | max |", "|---|---|---|---|---|---|"]
    for layer in margins["layers"]:
        q = layer["barrier_quantiles"]
        lines.append(f"| {layer['layer']} | " + " | ".join(
            f"{q[key]:.4g}" for key in ("q00", "q05", "q50", "q95", "q100")) + " |")
    lines += ["", "Noise gain ||x^l(x0 + delta) - x^l(x0)|| / ||delta|| (delta: 1% of the "
              "embedding RMS) and the spectrum of the self-maps M_t = I - J_t, per layer:", "",
              "| layer | noise gain | spectral radius, median | 95% | largest Re(lambda), "
              "median | 95% | tokens with Re(lambda) > 1 | smallest Re(lambda), 5% |",
              "|---" * 8 + "|"]
    for layer in margins["layers"]:
        spectrum = layer["spectrum"]
        radius, high = spectrum["spectral_radius_quantiles"], spectrum["eig_real_max_quantiles"]
        low = spectrum["eig_real_min_quantiles"]
        lines.append(f"| {layer['layer']} | {layer['noise_gain']:.3f} | {radius['q50']:.3f} | "
                     f"{radius['q95']:.3f} | {high['q50']:.3f} | {high['q95']:.3f} | "
                     f"{spectrum['fraction_real_above_one']:.1%} | {low['q05']:.3f} |")
    if margins.get("prior"):
        prior = margins["prior"]
        lines += ["", "The embedding prior's blocks J_t = I - Sigma_t A^T (t >= 2): log|det| "
                  f"median {prior['logdet_quantiles']['q50']:.4g} (5%: "
                  f"{prior['logdet_quantiles']['q05']:.4g}), margin median "
                  f"{prior['margin_quantiles']['q50']:.4g} (min "
                  f"{prior['margin_quantiles']['q00']:.4g}), infeasible "
                  f"{prior['infeasible_fraction']:.2%}."]
    lines += ["", "Per head (sigma_min of I - W_O^h G_t^h, the head acting alone):", "",
              "| layer | head | min | 5% | median | m_t <= tau |", "|---|---|---|---|---|---|"]
    for layer in margins["layers"]:
        for head in layer["heads"]:
            lines.append(f"| {layer['layer']} | {head['head']} | {head['margin_min']:.4f} | "
                         f"{head['margin_q05']:.4f} | {head['margin_median']:.4f} | "
                         f"{head['support_threshold_fraction']:.1%} |")
    return lines


def _windows_section(margins: dict) -> list[str]:
    if not margins["windows"]:
        return []
    lines = ["", f"## Support tokens in {margins['split']} windows", "",
             f"Under each window, per layer: `^` bottom-{margins['bottom_k']} margin, `*` "
             f"m_t <= tau = {margins['tau']:g}, `!` det J_t <= 0. A token's margin belongs to "
             "the position of the character above it (its latent u_t). "
             "\u21b5 is a newline.", ""]
    for window in margins["windows"]:
        pieces = [visible(piece) for piece in window.get("pieces", window["text"])]
        text = "".join(pieces)
        if len(text) == len(pieces):  # one character per token: marks under the text
            lines += [f"Window {window['window']} (characters {window['start']}-"
                      f"{window['start'] + len(text) - 1}):", "", "```", f"text    | {text}"]
            lines += [f"layer {layer['layer']:<2}| {_marker_line(layer, len(text))}"
                      for layer in window["layers"]]
        else:
            lines += [f"Window {window['window']} (tokens {window['start']}-"
                      f"{window['start'] + len(pieces) - 1}):", "", "```", text]
        lines += ["```", ""]
        for layer in window["layers"]:
            smallest = ", ".join(f"{pieces[i]!r}@{i} {layer['margin'][i]:.3f}"
                                 for i in sorted(layer["bottom_k"],
                                                 key=lambda i, m=layer["margin"]: m[i]))
            lines.append(f"* layer {layer['layer']} bottom-{len(layer['bottom_k'])}: {smallest}")
        lines.append("")
    return lines


def format_report(results: dict) -> str:
    """``eval_report.md``: what a person reads first; every number is also in the JSON."""
    settings, model = results["settings"], results["model"]
    bits = settings["bits"]
    unit = "character" if bits == "bpc" else "token"
    limit = settings["max_batches"]
    windows = "all full batches" if limit is None else f"at most {limit} batches"
    lines = [
        f"# Evaluation of {results['workdir_name']} at step {results['step']}", "",
        f"Model: {model['num_layers']} layers, {model['num_heads']} heads, d = "
        f"{model['d_model']}, context {model['context']}, vocabulary {model['vocab_size']}; "
        f"objective {results['objective']}. Data: {results['data']['source']}.",
        f"Windows: batches of {settings['batch_size']} x {settings['context']} {unit}s, "
        f"{windows} per split; noise seed {settings['seed']}.", "",
    ]
    if results["data"].get("note"):
        lines += [f"**Note:** {results['data']['note']}", ""]
    unknown = {split: n for split, n in (results["data"].get("num_unknown") or {}).items() if n}
    if unknown:
        counts = ", ".join(f"{split} {n:,}" for split, n in unknown.items())
        lines += [f"Held-out characters outside the train vocabulary (scored as the unknown "
                  f"id): {counts}.", ""]
    lines += [f"## Bits per {unit} and per byte", "",
              f"| split | bits per {unit} | bits per byte | top-1 accuracy | {unit}s | bytes |",
              "|---|---|---|---|---|---|"]
    for split, split_results in results["splits"].items():
        clean = split_results["clean"]
        lines.append(f"| {split} | {clean[bits]:.4f} | {clean['bpb']:.4f} | "
                     f"{clean['accuracy']:.3f} | {clean['num_tokens']:,} | "
                     f"{clean['num_bytes']:,} |")
    for split, reason in results["skipped_splits"].items():
        lines.append(f"| {split} | not evaluated: {reason} | | | | |")
    lines.append("")
    for split, split_results in results["splits"].items():
        layer = settings["noise_layer"]
        where = ("the token + position embedding x0" if not layer else
                 f"the residual stream entering block {layer}")
        clean = split_results["clean"]
        lines += [f"## Robustness to noise ({split})", "",
                  f"Gaussian noise of scale sigma on {where} (RMS {clean['latent_rms']:.4g} on "
                  f"this split); relative: times each token's RMS.", ""]
        lines += _robustness_table(split_results["robustness"], bits, clean[bits]) + [""]
    lines += _margin_section(results["margins"])
    lines += _windows_section(results["margins"])
    lines += ["", f"Plots: `{BPC_PLOT}`, `{MARGIN_PLOT}`. All numbers: `{RESULTS_FILE}`.", ""]
    return "\n".join(lines)
