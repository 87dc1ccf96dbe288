"""``evaluate_workdir(workdir)``: the evaluation metrics of math.md section 6 for a trained run.

It restores the latest checkpoint (read-only), then measures

* bits per character (per token in a subword model) and per UTF-8 byte, and next-token top-1
  accuracy on the held-out splits;
* robustness to embedding noise: Gaussian noise of scale sigma added to the layer-0 latent
  ``model.embed(tokens)`` (token + position embedding), either as it is ("absolute") or
  multiplied by each token's embedding RMS ("relative", which controls for a model that only
  grew its embeddings). Every condition reuses the same standard-normal draw per batch
  (``fold_in(PRNGKey(seed), batch)``), so the curves differ only by sigma and mode and a rerun
  reproduces them exactly;
* margin geometry on a few validation windows: m_t = sigma_min(J_t) per layer and head,
  the infeasible fraction (det J_t <= 0, from the sign of the layer-scope log-det), the barrier
  b_t, and the support tokens (m_t <= tau, and the bottom-k per window), shown in the text.

Everything is written into the workdir atomically (temp file + ``os.replace``):
``eval_results.json``, ``eval_report.md``, ``bpc_vs_sigma.png``, ``margin_hist.png`` and
``margins.npz`` (the raw per-token margins and their windows, for plots across runs).
Checkpoints are only read. Margins need one SVD per token and layer, so they are computed on a
bounded number of windows (``margin_batches`` x ``margin_batch_size``), never a whole split.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stm_jax import data, files
from stm_jax.core import barrier
from stm_jax.errors import UserError
from stm_jax.evaluation import (
    BPC_PLOT,
    MARGIN_PLOT,
    MARGINS_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    output_name,
    plots,
    report,
    result_tag,
)
from stm_jax.model import Record, add_embedding_noise
from stm_jax.trainer.restore import load_trained

DEFAULT_SIGMAS = (0.0, 0.1, 0.25, 0.5, 1.0)
NOISE_MODES = ("absolute", "relative")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


# ---------------------------------------------------------------------------------------------
# Noise and the scoring pass


def make_score_fn(graphdef, noise_layer: int = 0) -> Callable:
    """Jitted ``score(params, inputs, targets, key, sigma, relative) -> (nll_sum, correct,
    mean_squares)``: the noise on the residual stream entering block ``noise_layer`` (0: the
    layer-0 embedding x0), and the sum over tokens of that latent's mean square (its RMS).

    sigma and the mode are traced values, so one compilation serves every condition.
    """

    def score(params, inputs, targets, key, sigma, relative):
        model = nnx.merge(graphdef, params)
        x = model.residual_stream(model.embed(inputs), noise_layer)
        noise = jax.random.normal(key, x.shape, x.dtype)
        logits, _ = model.from_embeddings(add_embedding_noise(x, noise, sigma, relative),
                                          start_layer=noise_layer)
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = jnp.argmax(logits, axis=-1) == targets
        mean_squares = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1)  # per token
        return jnp.sum(nll), jnp.sum(correct), jnp.sum(mean_squares)

    return jax.jit(score)


def _conditions(sigmas: Sequence[float], modes: Sequence[str]) -> list[tuple[str, float]]:
    """(mode, sigma) pairs to run; sigma = 0 is the same clean pass for every mode."""
    pairs = [("clean", 0.0)]
    pairs += [(mode, sigma) for mode in modes for sigma in sigmas if sigma > 0]
    return pairs


def bits_key(vocab) -> str:
    """What ce / ln 2 is called: "bpc" (bits per character) in a character model, else
    "bits_per_token"; every model also gets "bpb", bits per UTF-8 byte."""
    return "bpc" if vocab.kind == "char" else "bits_per_token"


def score_split(score_fn, params, tokens, *, batch_size, context, max_batches, sigmas, modes,
                seed, token_bytes: np.ndarray, bits: str = "bpc") -> dict:
    """Bits per token (``bits``) and per byte, and accuracy, of one split under every
    (mode, sigma), summed over full batches; ``token_bytes``: the UTF-8 bytes of each id."""
    conditions = _conditions(sigmas, modes)
    totals = {condition: np.zeros(2) for condition in conditions}
    num_batches, num_bytes, base_key, squared = 0, 0, jax.random.PRNGKey(seed), 0.0
    for index, (inputs, targets) in enumerate(data.eval_batches(
            tokens, batch_size=batch_size, context=context, max_batches=max_batches)):
        key = jax.random.fold_in(base_key, index)
        for mode, sigma in conditions:
            nll, correct, squares = score_fn(params, inputs, targets, key, jnp.float32(sigma),
                                             jnp.asarray(mode == "relative"))
            totals[mode, sigma] += np.asarray([float(nll), float(correct)])
        squared += float(squares)
        num_batches += 1
        num_bytes += int(token_bytes[targets].sum())
    num_tokens = num_batches * batch_size * context
    # The noised latent's RMS over tokens and dimensions: absolute sigma in its units.
    rms = math.sqrt(squared / num_tokens)

    def summary(condition):
        nll, correct = totals[condition]
        return {bits: nll / num_tokens / math.log(2), "bpb": nll / num_bytes / math.log(2),
                "ce_nats": nll / num_tokens, "accuracy": correct / num_tokens}

    clean = summary(("clean", 0.0))

    def noisy_row(mode, sigma):
        row = {"sigma": float(sigma), **(clean if sigma == 0 else summary((mode, sigma)))}
        # Ratios depend on the clean values: reports show them next to clean BPC.
        row.update(accuracy_ratio=row["accuracy"] / clean["accuracy"] if clean["accuracy"]
                   else math.nan, bpc_ratio=row[bits] / clean[bits])
        if mode == "absolute":
            row["sigma_in_rms"] = float(sigma) / rms
        return row

    robustness = {mode: [noisy_row(mode, sigma) for sigma in sigmas] for mode in modes}
    return {"clean": {**clean, "num_batches": num_batches, "num_tokens": num_tokens,
                      "num_bytes": num_bytes, "latent_rms": rms},
            "robustness": robustness}


# ---------------------------------------------------------------------------------------------
# Margins and support tokens


def make_margin_fn(graphdef, gain_scale: float = 0.01) -> Callable:
    """Jitted ``stats(params, inputs, key)``: per layer (L, B, ...), the log-dets, signs and
    margins of both scopes, the self-map spectrum (``attention.self_map_spectrum``), and the
    noise gain ||x^l(x0 + delta) - x^l(x0)|| / ||delta|| of each token for a random delta of
    ``gain_scale`` times its embedding RMS (the layer's output x^l, l = 1..L); with an
    embedding prior, its blocks' statistics as "prior_*" (B, T - 1)."""

    def stats(params, inputs, key):
        model = nnx.merge(graphdef, params)
        x0 = model.embed(inputs)
        record = Record(scope="both", margins=True, spectra=True, hidden=True)
        _, per_layer = model.from_embeddings(x0, record=record)
        rms = jnp.sqrt(jnp.mean(jnp.square(x0), axis=-1, keepdims=True))
        delta = gain_scale * rms * jax.random.normal(key, x0.shape, x0.dtype)
        _, perturbed = model.from_embeddings(x0 + delta, record=Record(hidden=True))
        change = jnp.linalg.norm(perturbed["hidden"] - per_layer.pop("hidden"), axis=-1)
        per_layer["noise_gain"] = change / jnp.linalg.norm(delta, axis=-1)[None]
        if model.prior is not None and inputs.shape[-1] > 1:
            positions = jnp.arange(1, inputs.shape[-1])  # J_1 = I: t >= 2
            prior_stats = model.prior(x0, positions=positions, margins=True)
            per_layer.update({f"prior_{name}": value for name, value in prior_stats.items()
                              if name != "residual_sq"})
        return per_layer

    return jax.jit(stats)


def margin_windows(margin_fn, params, tokens, *, context, batch_size, num_batches,
                   seed: int = 0) -> tuple:
    """(inputs (N, T), stats {name: (L, N, ...)}) for the first validation windows."""
    batches = data.eval_batches(tokens, batch_size=batch_size, context=context,
                                max_batches=num_batches)
    inputs, stats = [], []
    for index, (batch_inputs, _) in enumerate(batches):
        inputs.append(batch_inputs)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        stats.append(jax.device_get(margin_fn(params, batch_inputs, key)))
    # Layer statistics are (L, B, ...), the prior's (B, ...): join along the batch axis.
    joined = {name: np.concatenate([s[name] for s in stats], axis=0 if name.startswith(
        "prior_") else 1) for name in stats[0]}
    return np.concatenate(inputs), joined


def _quantiles(values: np.ndarray) -> dict:
    return {key: float(value) for key, value in barrier.margin_quantiles(values, QUANTILES).items()}


def layer_margin_statistics(stats: dict, *, tau: float, bottom_k: int, barrier_eps: float
                            ) -> list[dict]:
    """Per layer: margin quantiles, infeasible fraction, barrier quantiles, support counts."""
    layers = []
    for layer in range(stats["margin"].shape[0]):
        margin, sign = stats["margin"][layer], stats["sign"][layer]  # (N, T)
        head_margin = stats["head_margin"][layer]  # (N, H, T)
        _, bottom_mask = barrier.support_tokens_bottom_k(margin, bottom_k)
        bottom = margin[np.asarray(bottom_mask)]
        below = np.asarray(barrier.support_tokens_threshold(margin, tau))
        barrier_values = barrier.smooth_log_barrier(sign, stats["logdet"][layer], barrier_eps)
        layers.append({
            "layer": layer,
            "margin_quantiles": _quantiles(margin),
            "margin_min": float(margin.min()),
            "margin_q05": float(np.quantile(margin, 0.05)),
            "infeasible_fraction": float(np.mean(np.asarray(barrier.infeasible(sign)))),
            "infeasible_tokens": int(np.sum(np.asarray(barrier.infeasible(sign)))),
            "barrier_quantiles": _quantiles(np.asarray(barrier_values)),
            "support_threshold_count": int(below.sum()),
            "support_threshold_fraction": float(below.mean()),
            "bottom_k_mean_margin": float(bottom.mean()),
            "bottom_k_max_margin": float(bottom.max()),
            "noise_gain": float(np.mean(stats["noise_gain"][layer])),
            "spectrum": {
                "spectral_radius_quantiles": _quantiles(stats["spectral_radius"][layer]),
                "eig_real_max_quantiles": _quantiles(stats["eig_real_max"][layer]),
                "eig_real_min_quantiles": _quantiles(stats["eig_real_min"][layer]),
                "fraction_real_above_one": float(np.mean(stats["eig_real_max"][layer] > 1.0)),
            },
            "heads": [{"head": head, "margin_min": float(head_margin[:, head].min()),
                       "margin_q05": float(np.quantile(head_margin[:, head], 0.05)),
                       "margin_median": float(np.median(head_margin[:, head])),
                       "support_threshold_fraction": float(np.mean(head_margin[:, head] <= tau))}
                      for head in range(head_margin.shape[1])],
        })
    return layers


def prior_statistics(stats: dict) -> dict | None:
    """The embedding prior's blocks on the margin windows (t >= 2), or None without one."""
    if "prior_logdet" not in stats:
        return None
    sign = stats["prior_sign"]
    return {"logdet_quantiles": _quantiles(stats["prior_logdet"]),
            "margin_quantiles": _quantiles(stats["prior_margin"]),
            "infeasible_fraction": float(np.mean(sign <= 0))}


def support_window_details(inputs: np.ndarray, stats: dict, vocab: data.Vocab, *, count: int,
                           tau: float, bottom_k: int, context: int) -> list[dict]:
    """The first ``count`` windows: text, and per layer the margins and support tokens."""
    windows = []
    for index in range(min(count, len(inputs))):
        layers = []
        for layer in range(stats["margin"].shape[0]):
            margin = stats["margin"][layer, index]
            indices, _ = barrier.support_tokens_bottom_k(margin, bottom_k)
            layers.append({
                "layer": layer,
                "margin": margin.tolist(),
                "bottom_k": sorted(np.asarray(indices).tolist()),
                "below_tau": np.flatnonzero(margin <= tau).tolist(),
                "infeasible": np.flatnonzero(stats["sign"][layer, index] <= 0).tolist(),
            })
        windows.append({"window": index, "start": index * context,
                        "text": vocab.decode(inputs[index]),
                        "pieces": vocab.pieces(inputs[index]), "layers": layers})
    return windows


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_options(sigmas, noise_modes, splits, margin_batches, margin_batch_size, tau,
                   bottom_k, support_windows, context) -> tuple[list[float], list[str]]:
    sigmas = sorted({float(s) for s in sigmas})
    if not sigmas or any(not (math.isfinite(s) and s >= 0) for s in sigmas):
        raise UserError(f"sigmas={sigmas} must be finite and >= 0 (and at least one)")
    modes = list(dict.fromkeys(noise_modes))
    unknown = [m for m in modes if m not in NOISE_MODES]
    if unknown or not modes:
        raise UserError(f"noise modes {unknown or modes} are not among {NOISE_MODES}")
    if not splits:
        raise UserError("give at least one split to evaluate")
    if margin_batches < 1 or margin_batch_size < 1 or support_windows < 0:
        raise UserError("margin_batches and margin_batch_size must be >= 1 and "
                         f"support_windows >= 0, got {margin_batches}, {margin_batch_size}, "
                         f"{support_windows}")
    if not 1 <= bottom_k <= context:
        raise UserError(f"bottom_k={bottom_k} must be between 1 and the context ({context})")
    if not math.isfinite(tau):
        raise UserError(f"tau={tau} must be finite")
    return sigmas, modes


def evaluate_workdir(
    workdir: str | Path,
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    noise_modes: Sequence[str] = NOISE_MODES,
    max_batches: int | None = None,
    splits: Sequence[str] = ("validation", "test"),
    margin_batches: int = 2,
    margin_batch_size: int = 8,
    tau: float = 0.1,
    bottom_k: int = 8,
    support_windows: int = 3,
    seed: int = 0,
    step: int | None = None,
    noise_layer: int = 0,
    output_tag: str = "",
) -> dict:
    """Evaluates ``workdir``'s latest checkpoint (or ``step``); writes and returns the results.

    Args:
      sigmas, noise_modes: the robustness grid; sigma = 0 is one clean pass shared by the modes.
      max_batches: full batches (``config.batch_size`` windows of ``model.context``) per split
        and condition; None scores every full batch, as training's final evaluation does.
      splits: splits to score. Splits the dataset lacks (the nanoGPT split of Tiny Shakespeare
        has no test split) or too short for one batch are skipped and named in
        ``results["skipped_splits"]``.
      margin_batches, margin_batch_size: the validation windows margins are computed on.
      tau, bottom_k: the support-token rules (m_t <= tau; the k smallest per window).
      support_windows: how many of those windows the report shows with their support tokens.
      seed: the noise draw; the same seed reproduces every number.
      noise_layer: put the noise on the residual stream entering block L instead of x0
        (L = 0); its results go to files named with ``_noise_layerL`` (``output_name``).
      output_tag: names the result files ``eval_results_TAG.json`` etc. (for example the
        study's ``step250`` for an earlier checkpoint), leaving the standard ones alone.
    """
    workdir = files.as_path(workdir)  # local, or a bucket (gs://)
    model, config, vocab, step = load_trained(workdir, step)
    context, batch_size = config.model.context, config.batch_size
    sigmas, modes = _check_options(sigmas, noise_modes, splits, margin_batches, margin_batch_size,
                                   tau, min(bottom_k, context), support_windows, context)
    bottom_k = min(bottom_k, context)
    if not 0 <= noise_layer < config.model.num_layers:
        raise UserError(f"noise_layer={noise_layer} must be between 0 (the embedding) and "
                        f"{config.model.num_layers - 1}, the last block's input")
    tokens, _, info = data.load_dataset(config.data, workdir)  # reuses vocab.json, writes nothing
    graphdef, params = nnx.split(model)

    score_fn, split_results, skipped = make_score_fn(graphdef, noise_layer), {}, {}
    for split in splits:
        if split not in tokens:
            skipped[split] = (f"the dataset has no {split!r} split (it has "
                              f"{', '.join(sorted(tokens))})")
            continue
        try:
            data.num_eval_batches(len(tokens[split]), batch_size=batch_size, context=context)
        except ValueError as error:
            skipped[split] = str(error)
            continue
        split_results[split] = score_split(
            score_fn, params, tokens[split], batch_size=batch_size, context=context,
            max_batches=max_batches, sigmas=sigmas, modes=modes, seed=seed,
            token_bytes=vocab.token_bytes, bits=bits_key(vocab))

    margin_inputs, stats = margin_windows(
        make_margin_fn(graphdef), params, tokens["validation"], context=context,
        batch_size=min(margin_batch_size, (len(tokens["validation"]) - 1) // context),
        num_batches=margin_batches, seed=seed)
    margins = {
        "split": "validation", "num_windows": len(margin_inputs),
        "num_tokens": int(margin_inputs.size), "tau": tau, "bottom_k": bottom_k,
        "layers": layer_margin_statistics(stats, tau=tau, bottom_k=bottom_k,
                                          barrier_eps=config.objective.barrier_eps),
        "windows": support_window_details(margin_inputs, stats, vocab, count=support_windows,
                                          tau=tau, bottom_k=bottom_k, context=context),
        "prior": prior_statistics(stats),
    }
    results = {
        "workdir_name": (workdir.resolve() if files.is_local(workdir) else workdir).name,
        "step": step,
        "model": config.model.to_dict(), "objective": _describe_objective(config.objective),
        "data": {key: info.get(key) for key in ("name", "source", "note", "num_unknown")},
        "settings": {"sigmas": sigmas, "noise_modes": modes, "splits": list(splits),
                     "max_batches": max_batches, "batch_size": batch_size, "context": context,
                     "margin_batches": margin_batches, "margin_batch_size": margin_batch_size,
                     "seed": seed, "bits": bits_key(vocab), "tokenizer": vocab.describe(),
                     "noise_layer": noise_layer},
        "splits": split_results, "skipped_splits": skipped, "margins": margins,
    }
    _write_outputs(workdir, results, stats, tau, margin_inputs,
                   result_tag(output_tag, noise_layer))
    return results



def _describe_objective(objective_cfg) -> str:
    """e.g. "margin (lambda_m=0.02, lambda_s=0)": what the reader compares models by."""
    return (f"{objective_cfg.variant} (lambda_m={objective_cfg.lambda_m:g}, "
            f"lambda_s={objective_cfg.lambda_s:g})")


def margins_npz(inputs: np.ndarray, stats: dict) -> bytes:
    """The margin windows' token ids (N, T), margins and signs (L, N, T), head margins."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=inputs.astype(np.int32),
                        margin=stats["margin"].astype(np.float32), sign=stats["sign"],
                        head_margin=stats["head_margin"].astype(np.float32))
    return buffer.getvalue()


def _write_outputs(workdir: Path, results: dict, stats: dict, tau: float,
                   margin_inputs: np.ndarray, tag: str) -> None:
    files.write_json(workdir / output_name(RESULTS_FILE, tag), results)
    files.write_text(workdir / output_name(REPORT_FILE, tag), report.format_report(results))
    files.write_png(workdir / output_name(BPC_PLOT, tag), plots.plot_bpc_vs_sigma(results))
    files.write_png(workdir / output_name(MARGIN_PLOT, tag), plots.plot_margin_hist(
        stats["margin"], stats["sign"], tau, results["step"]))
    files.write_bytes(workdir / output_name(MARGINS_FILE, tag), margins_npz(margin_inputs, stats))
