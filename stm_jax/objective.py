"""The MAP objective: cross-entropy + lambda_m x smooth log-barrier + lambda_s x prior.

math.md section 5. One differentiable function of the model and a batch returns
``(loss, aux)`` with every term in ``aux``, so logging never recomputes anything.

Choices (configurable through the ``objective`` sub-config):
  * ``scope``: "layer" uses the exact det J_t of each layer; "head" uses each head's diagonal
    block, and a token's barrier is the sum of its heads' barriers (every head's determinant
    must stay positive).
  * ``layers``: "embedding" (first layer only) or "all".
  * ``barrier_fraction`` < 1 estimates the barrier's mean from a uniformly random subset of
    that fraction of positions per step: unbiased for the exact mean, at that fraction of the
    cost. Evaluation (no dropout key) is always exact. ``barrier_sampling`` "per_sequence"
    (default) draws each sequence's subset independently; "shared" draws one subset for the
    whole batch (what the reproduction study used). Both share it across layers and cost the
    same; per sequence, B independent draws average out the barrier's strong dependence on
    position, so the estimate varies less (benchmarks/ measures the spread of both).
  * ``barrier_step_fraction`` q < 1 evaluates the barrier on a random fraction q of training
    steps only, weighted by 1/q ("lazy" regularisation, as StyleGAN2 does for R1): unbiased
    for the barrier's gradient, at q times its cost. Each step carries its barrier weight
    (``steps.barrier_weights``: 1/q or 0), and a step of weight 0 is compiled without the
    Jacobian work, so it costs exactly a CE-only step.
  * ``barrier_floor`` (beyond the paper; off at -inf): each determinant's barrier is
    max(b, floor). With 0 it stops at det = 1, so it penalises contraction without rewarding
    expansion: -log det J_t is unbounded below, and the reproduction study found training
    drives its determinants far above 1 without moving the margins (results/).
  * ``chunk_size`` > 0 computes the log-dets in chunks of positions under ``jax.checkpoint``:
    the same numbers in bounded memory.
  * The prior's noise scales sigma_l are learned (log-parameterised, in the model) with a
    weak log-normal hyperprior (log sigma_l ~ N(0, hyperprior_scale^2)) counted once per
    batch, i.e. divided by the batch's token count like every other term.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from stm_jax.core import barrier
from stm_jax.errors import UserError
from stm_jax.model import Record, at_least_float32

SAMPLINGS = ("per_sequence", "shared")  # objective.barrier_sampling
SCOPES = ("head", "layer")  # objective.scope
LAYER_SETS = ("embedding", "all")  # objective.layers


def validate_config(cfg) -> None:
    """Raise :class:`UserError` with one clear line for an objective config that makes no
    sense (the defaults are in configs/common.py)."""
    for name in ("lambda_m", "lambda_s"):
        if cfg[name] < 0:
            raise UserError(f"objective.{name}={cfg[name]} is negative; it must be >= 0")
    if cfg.layers not in LAYER_SETS:
        raise UserError(f"objective.layers={cfg.layers!r}; expected one of {list(LAYER_SETS)}")
    if cfg.scope not in SCOPES:
        raise UserError(f"objective.scope={cfg.scope!r}; expected one of {list(SCOPES)}")
    if not cfg.barrier_eps > 0:
        raise UserError(f"objective.barrier_eps={cfg.barrier_eps} must be positive")
    if not 0 < cfg.barrier_fraction <= 1:
        raise UserError(f"objective.barrier_fraction={cfg.barrier_fraction} must be in (0, 1]")
    if cfg.barrier_sampling not in SAMPLINGS:
        raise UserError(f"objective.barrier_sampling={cfg.barrier_sampling!r}; expected one of "
                        f"{list(SAMPLINGS)}")
    if not 0 < cfg.barrier_step_fraction <= 1:
        raise UserError(f"objective.barrier_step_fraction={cfg.barrier_step_fraction} must be "
                        "in (0, 1]")
    if cfg.chunk_size < 0:
        raise UserError(f"objective.chunk_size={cfg.chunk_size} must be >= 0 (0: no chunks)")
    if not cfg.hyperprior_scale > 0:
        raise UserError(f"objective.hyperprior_scale={cfg.hyperprior_scale} must be positive")


def barrier_positions(batch: int, num_tokens: int, fraction: float, key: jax.Array | None,
                      sampling: str = "per_sequence"):
    """Uniformly random subsets of n = round(fraction T) positions, sorted, or None for all.

    "per_sequence": (B, n), one independent subset per sequence; "shared": (n,) for all.
    """
    if key is None or fraction >= 1.0:
        return None
    count = max(1, round(fraction * num_tokens))

    def subset(subset_key):
        return jnp.sort(jax.random.choice(subset_key, num_tokens, (count,), replace=False))

    if sampling == "shared":
        return subset(key)
    return jax.vmap(subset)(jax.random.split(key, batch))


def barrier_step_selected(key: jax.Array, step_fraction: float) -> jax.Array:
    """Whether the step with this key evaluates the barrier: true with probability q."""
    return jax.random.bernoulli(jax.random.fold_in(key, 2), step_fraction)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32 at least."""
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(
        at_least_float32(logits), targets)
    return jnp.mean(losses)


def barrier_term(stats: dict, cfg) -> tuple[jax.Array, dict]:
    """mean_{l,t} b_t^l and the determinant diagnostics that go with it."""
    head = cfg.scope == "head"
    sign, logabsdet = ((stats["head_sign"], stats["head_logdet"]) if head  # (L, B, H, T)
                       else (stats["sign"], stats["logdet"]))  # (L, B, T)
    per_det = jnp.maximum(barrier.smooth_log_barrier(sign, logabsdet, cfg.barrier_eps),
                          cfg.barrier_floor)
    per_token = jnp.sum(per_det, axis=2) if head else per_det
    diagnostics = {
        "infeasible_tokens": barrier.infeasible_count(sign),
        "infeasible_fraction": jnp.mean(barrier.infeasible(sign).astype(jnp.float32)),
        "logdet_min": jnp.min(jnp.where(sign > 0, logabsdet, -jnp.inf)),
        "logdet_mean": jnp.mean(logabsdet),
    }
    return jnp.mean(per_token), diagnostics


def prior_term(
    residual_sq: jax.Array, log_noise_scale: jax.Array, dim: int, cfg,
    batch_tokens: int | None = None,
) -> tuple[jax.Array, dict]:
    """mean_{l,t}[||e||^2 / (2 sigma_l^2) + d log sigma_l] plus the weak hyperprior.

    residual_sq: (L', B, T) squared residual norms of the layers in the layer set. The
    hyperprior is counted once per training batch: divided by ``batch_tokens``, the whole
    batch's token count (default: this one's; a microbatch passes its batch's).
    """
    num_stat_layers = residual_sq.shape[0]
    log_sigma = at_least_float32(log_noise_scale[:num_stat_layers])  # "embedding" -> first
    per_token = (residual_sq * jnp.exp(-2 * log_sigma)[:, None, None] / 2
                 + dim * log_sigma[:, None, None])
    hyperprior = jnp.sum((log_sigma / cfg.hyperprior_scale) ** 2) / 2
    tokens_per_batch = batch_tokens or residual_sq.shape[1] * residual_sq.shape[2]
    diagnostics = {"noise_scale": jnp.exp(log_sigma), "residual_rms": jnp.sqrt(
        jnp.mean(residual_sq) / dim)}
    return jnp.mean(per_token) + hyperprior / tokens_per_batch, diagnostics


def map_objective(model, inputs, targets, cfg, *, dropout_key=None,
                  barrier_weight: float = 1.0,
                  batch_tokens: int | None = None) -> tuple[jax.Array, dict]:
    """The MAP loss of ``model`` on a batch ``inputs, targets: (B, T)``: (loss, aux).

    ``barrier_weight`` multiplies lambda_m (a Python float, fixed per compiled step): 1 on
    every step by default; the lazy barrier's steps carry 1/q or 0 (``steps.barrier_weights``),
    and a step with weight 0 is compiled without the Jacobian work and reports no barrier.

    ``batch_tokens``: the token count of the training batch this one is a microbatch of
    (see ``accumulation.py``); by default this batch's.
    """
    with_barrier = cfg.lambda_m > 0 and barrier_weight > 0
    position_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    positions = barrier_positions(*inputs.shape, cfg.barrier_fraction, position_key,
                                  cfg.barrier_sampling)
    record = Record(scope=cfg.scope if with_barrier else "none", layers=cfg.layers,
                    residuals=cfg.lambda_s > 0, positions=positions, chunk_size=cfg.chunk_size)
    logits, stats = model(inputs, dropout_key=dropout_key, record=record)
    ce = cross_entropy(logits, targets)
    loss, aux = ce, {"ce": ce, "bpc": ce / math.log(2)}
    if cfg.lambda_m > 0:
        aux["barrier_weight"] = jnp.float32(barrier_weight)
    if with_barrier:
        barrier_value, diagnostics = barrier_term(stats, cfg)
        loss = loss + cfg.lambda_m * barrier_weight * barrier_value
        aux.update(barrier=barrier_value, **diagnostics)
    if cfg.lambda_s > 0:
        prior_value, diagnostics = prior_term(
            stats["residual_sq"], model.log_noise_scale[...], model.token_embed.features, cfg,
            batch_tokens)
        loss = loss + cfg.lambda_s * prior_value
        aux.update(prior=prior_value, **diagnostics)
    aux["loss"] = loss
    return loss, aux


def combine_microbatch_aux(aux: dict) -> dict:
    """Merge ``map_objective``'s metrics stacked over equal microbatches (leading axis) into
    the whole batch's: counts add up, minima stay minima, RMS values combine as RMS, and
    every other metric (a mean over equal-size microbatches, or the same in each) averages."""
    reductions = {"infeasible_tokens": jnp.sum, "logdet_min": jnp.min,
                  "residual_rms": lambda x, axis: jnp.sqrt(jnp.mean(x**2, axis=axis))}
    return {name: reductions.get(name, jnp.mean)(value, axis=0) for name, value in aux.items()}
