"""``analyze(checkpoint, text_file, out)``: margins, log-dets, barrier and support tokens of a
model on a text, per layer and head (``scripts/analyze.py``).

The checkpoint is a training workdir or a Hugging Face GPT-2 directory
(``restore.load_checkpoint``). The text's first ``max_tokens`` tokens are cut into windows of
the model's context (each starts at position 0, as in training) and run through the model
once; each layer's attention input u^l is kept, and the Jacobian statistics are computed from
it in chunks of positions, so memory holds one chunk's blocks (at d = 768, a token's
(H, p, d) factors are 3 MB).

Scopes (math.md sections 2-3):

* "head" (default): each head's block J_t^h = I - W_O^h G_t^h: its log-det (a p x p
  determinant), sign and margin sigma_min (an SVD of a 2p x 2p reduction). A token's barrier
  is the sum of its heads' (as in training with ``objective.scope=head``), it is infeasible if
  any head's determinant is <= 0, and its margin is the smallest of its heads'.
* "layer": everything above, and the exact J_t: its log-det (an Hp x Hp determinant) and margin
  (a d x d SVD per token when 2Hp >= d, as in GPT-2), which then define the token's
  barrier, feasibility and margin. The README says what this costs at d = 768.

Support tokens of a layer (or head): the ``bottom_k`` smallest margins of each window, and every
token with margin <= ``tau``. Written into ``out``: ``analysis.json`` (every number),
``analysis.md`` (the report), ``margins.png``, ``head_margins.png``, ``analysis.npz`` (the
per-head arrays) and ``analysis.html`` (the text with each layer's support tokens marked).
Nothing is written until every input has been read and checked.
"""

from __future__ import annotations

import html
import io
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stm_jax import files
from stm_jax.core import attention, barrier
from stm_jax.errors import UserError
from stm_jax.model import Record
from stm_jax.trainer.restore import load_checkpoint

ANALYSIS_FILE = "analysis.json"
REPORT_FILE = "analysis.md"
HTML_FILE = "analysis.html"
ARRAYS_FILE = "analysis.npz"
MARGIN_PLOT = "margins.png"
HEAD_PLOT = "head_margins.png"
SCOPES = ("head", "layer")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def read_text(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--text_file {str(path)!r} does not exist or is not a file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"--text_file {str(path)!r} is not UTF-8 text (byte {error.start:,}: "
                        f"{error.reason}); convert it to UTF-8.") from None
    if not text:
        raise UserError(f"--text_file {str(path)!r} is empty; give a file with text in it.")
    return text


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; pass a folder.")
    return out


# ---------------------------------------------------------------------------------------------
# The statistics of one window


def _forward_fn(graphdef, scope: str):
    """Jitted (params, window (1, T)) -> per-layer stats with "input" (L, 1, T, d)."""
    record = Record(scope="both" if scope == "layer" else "head", inputs=True)

    def forward(params, window):
        model = nnx.merge(graphdef, params)
        _, stats = model.from_embeddings(model.embed(window), record=record)
        return stats

    return jax.jit(forward)


@jax.jit
def _head_margins(params, u, positions):
    return attention.margins_of(params, attention.attention_moments(params, u), "head",
                                positions)


@jax.jit
def _layer_margins(params, u, positions):
    return attention.margins_of(params, attention.attention_moments(params, u), "layer",
                                positions)


def _chunked(fn, params, u, chunk: int, bar) -> np.ndarray:
    """``fn`` over positions in chunks of ``chunk`` (the last one padded), joined on the last
    axis: (..., T)."""
    num = u.shape[0]
    parts = []
    for start in range(0, num, chunk):
        positions = np.minimum(np.arange(start, start + chunk), num - 1)
        parts.append(np.asarray(fn(params, u, jnp.asarray(positions)))[..., :num - start])
        bar.update(min(chunk, num - start))
    return np.concatenate(parts, axis=-1)


def window_stats(model, forward, window: np.ndarray, scope: str, chunk: int, bar) -> dict:
    """Per layer (L, ...) arrays of one window: head_logdet, head_sign, head_margin (L, H, T)
    and with the layer scope logdet, sign, margin (L, T)."""
    graphdef, params = nnx.split(model)
    stats = jax.device_get(forward(params, jnp.asarray(window)[None]))
    result = {"head_logdet": stats["head_logdet"][:, 0], "head_sign": stats["head_sign"][:, 0]}
    if scope == "layer":
        result.update(logdet=stats["logdet"][:, 0], sign=stats["sign"][:, 0])
    head_margins, layer_margins = [], []
    for block, u in zip(model.blocks, stats["input"][:, 0], strict=True):
        block_params = block.attention_params(model.compute_dtype)
        head_margins.append(_chunked(_head_margins, block_params, u, chunk, bar))
        if scope == "layer":
            layer_margins.append(_chunked(_layer_margins, block_params, u, chunk, bar))
    result["head_margin"] = np.stack(head_margins)
    if scope == "layer":
        result["margin"] = np.stack(layer_margins)
    return result


# ---------------------------------------------------------------------------------------------
# Summaries


def _quantiles(values) -> dict:
    return {key: float(value) for key, value in
            barrier.margin_quantiles(np.asarray(values), QUANTILES).items()}


def support_tokens(margin: np.ndarray, windows: list[int], tau: float, bottom_k: int
                   ) -> list[int]:
    """Indices (into the whole token sequence) of the bottom_k margins of each window and of
    every margin <= tau."""
    chosen, start = set(np.flatnonzero(margin <= tau).tolist()), 0
    for length in windows:
        part = margin[start:start + length]
        chosen.update((start + np.argsort(part, kind="stable")[:bottom_k]).tolist())
        start += length
    return sorted(chosen)


def token_statistics(arrays: dict, scope: str, eps: float) -> dict:
    """Per layer and token (L, T): margin, barrier, infeasible, and log-det (the layer scope's
    exact one, or the sum over heads)."""
    head_barrier = np.asarray(barrier.smooth_log_barrier(arrays["head_sign"],
                                                         arrays["head_logdet"], eps))
    if scope == "layer":
        return {"margin": arrays["margin"], "logdet": arrays["logdet"],
                "barrier": np.asarray(barrier.smooth_log_barrier(arrays["sign"],
                                                                 arrays["logdet"], eps)),
                "infeasible": arrays["sign"] <= 0, "head_barrier": head_barrier}
    return {"margin": arrays["head_margin"].min(axis=1),
            "logdet": arrays["head_logdet"].sum(axis=1), "barrier": head_barrier.sum(axis=1),
            "infeasible": (arrays["head_sign"] <= 0).any(axis=1), "head_barrier": head_barrier}


def summarise(arrays: dict, windows: list[int], *, scope: str, tau: float, bottom_k: int,
              eps: float) -> list[dict]:
    per_token = token_statistics(arrays, scope, eps)
    layers = []
    for layer in range(per_token["margin"].shape[0]):
        heads = []
        for head in range(arrays["head_margin"].shape[1]):
            margin = arrays["head_margin"][layer, head]
            heads.append({
                "head": head, "margin_quantiles": _quantiles(margin),
                "logdet_quantiles": _quantiles(arrays["head_logdet"][layer, head]),
                "barrier_mean": float(per_token["head_barrier"][layer, head].mean()),
                "infeasible_fraction": float(np.mean(arrays["head_sign"][layer, head] <= 0)),
                "support": support_tokens(margin, windows, tau, bottom_k)})
        margin = per_token["margin"][layer]
        layers.append({
            "layer": layer, "margin": margin.tolist(),
            "logdet": per_token["logdet"][layer].tolist(),
            "barrier": per_token["barrier"][layer].tolist(),
            "margin_quantiles": _quantiles(margin),
            "barrier_quantiles": _quantiles(per_token["barrier"][layer]),
            "barrier_mean": float(per_token["barrier"][layer].mean()),
            "infeasible_fraction": float(per_token["infeasible"][layer].mean()),
            "support": support_tokens(margin, windows, tau, bottom_k), "heads": heads})
    return layers


# ---------------------------------------------------------------------------------------------
# Entry point


def analyze(
    checkpoint: str | Path,
    text_file: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    step: int | None = None,
    scope: str = "head",
    max_tokens: int = 512,
    tau: float = 0.1,
    bottom_k: int = 8,
    barrier_eps: float = 1e-2,
    chunk_size: int = 32,
    progress: bool = True,
) -> dict:
    """Analyses ``checkpoint`` on the first ``max_tokens`` tokens of ``text_file``; writes
    the files of the module docstring into ``out`` and returns what analysis.json holds."""
    from tqdm import tqdm

    if scope not in SCOPES:
        raise UserError(f"--scope={scope!r}; expected one of {SCOPES}")
    if max_tokens < 1 or bottom_k < 1 or chunk_size < 1 or not barrier_eps > 0:
        raise UserError("--max_tokens, --bottom_k and --chunk_size must be >= 1 and "
                        "--barrier_eps > 0")
    out = _check_out(Path(out).expanduser())
    text = read_text(text_file)
    model, vocab, description = load_checkpoint(checkpoint, tokenizer=tokenizer, step=step)
    try:
        ids = vocab.encode(text)[:max_tokens]
    except ValueError as error:
        raise UserError(f"--text_file has {error}; a character model reads only the characters "
                        "it was trained on.") from None
    context = model.context
    windows = [len(ids[start:start + context]) for start in range(0, len(ids), context)]
    forward = _forward_fn(nnx.split(model)[0], scope)
    work = len(ids) * len(model.blocks) * (2 if scope == "layer" else 1)
    parts = []
    with tqdm(total=work, unit="tok", desc=f"{scope} scope", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), context):
            parts.append(window_stats(model, forward, ids[start:start + context], scope,
                                      chunk_size, bar))
    arrays = {name: np.concatenate([part[name] for part in parts], axis=-1)
              for name in parts[0]}
    pieces = vocab.pieces(ids)
    heads = arrays["head_margin"].shape[1]
    results = {
        "checkpoint": description, "text_file": Path(text_file).name,
        "tokenizer": vocab.describe(),
        "model": {"num_layers": len(model.blocks), "num_heads": heads,
                  "d_model": model.token_embed.features, "context": context,
                  "vocab_size": vocab.size},
        "settings": {"scope": scope, "max_tokens": max_tokens, "tau": tau,
                     "bottom_k": bottom_k, "barrier_eps": barrier_eps,
                     "windows": windows},
        "num_tokens": len(ids), "tokens": pieces, "ids": ids.tolist(),
        "layers": summarise(arrays, windows, scope=scope, tau=tau, bottom_k=bottom_k,
                            eps=barrier_eps),
    }
    _write(out, results, arrays)
    return results


def _write(out: Path, results: dict, arrays: dict) -> None:
    from stm_jax.evaluation import analysis_report

    files.write_json(out / ANALYSIS_FILE, results)
    files.write_text(out / REPORT_FILE, analysis_report.format_report(results))
    files.write_text(out / HTML_FILE, format_html(results))
    files.write_png(out / MARGIN_PLOT, analysis_report.plot_margins(results))
    files.write_png(out / HEAD_PLOT, analysis_report.plot_head_margins(results))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, ids=np.asarray(results["ids"], np.int32),
                        **{name: value.astype(np.float32) if value.dtype.kind == "f" else value
                           for name, value in arrays.items()})
    files.write_bytes(out / ARRAYS_FILE, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# The HTML page

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
pre.text { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.6;
           background: #fafafa; padding: 0.8em; border: 1px solid #ddd; }
span.support { background: #ffd27a; border-radius: 2px; box-shadow: inset -1px 0 0 #fff; }
span.support.below-tau { background: #ff8a80; }
span.tok:empty::after { content: "\\25ab"; color: #999; }
"""


def format_html(results: dict) -> str:
    """The text once per layer, each support token in ``<span class="tok support">`` (title:
    its margin), every other token in ``<span class="tok">``."""
    settings = results["settings"]
    tau = settings["tau"]
    sections = []
    for layer in results["layers"]:
        support, margin = set(layer["support"]), layer["margin"]
        spans = []
        for index, piece in enumerate(results["tokens"]):
            classes = "tok"
            if index in support:
                classes += " support" + (" below-tau" if margin[index] <= tau else "")
            spans.append(f'<span class="{classes}" data-index="{index}" '
                         f'title="token {index}: margin {margin[index]:.4g}">'
                         f"{html.escape(piece)}</span>")
        sections.append(
            f'<section class="layer" data-layer="{layer["layer"]}">\n'
            f'<h2>Layer {layer["layer"]}: {len(support)} support tokens</h2>\n'
            f'<p>margin min {layer["margin_quantiles"]["q00"]:.4g}, median '
            f'{layer["margin_quantiles"]["q50"]:.4g}; infeasible '
            f'{layer["infeasible_fraction"]:.1%}; mean barrier {layer["barrier_mean"]:.4g}</p>\n'
            f'<pre class="text">{"".join(spans)}</pre>\n</section>')
    title = f"Support tokens of {results['checkpoint']}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{results['num_tokens']} tokens of {html.escape(results['text_file'])} "
        f"({html.escape(results['tokenizer'])}), {settings['scope']} scope. Highlighted: the "
        f"{settings['bottom_k']} smallest margins of each window of {results['model']['context']}"
        f" tokens, and in red every margin &lt;= tau = {tau:g}. Hover a token for its "
        "margin.</p>",
        *sections, "</body></html>", ""])
