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

from stm_jax.core import barrier, penalties
from stm_jax.errors import UserError
from stm_jax.model import Record, add_embedding_noise, at_least_float32

SAMPLINGS = ("per_sequence", "shared")  # objective.barrier_sampling
SCOPES = ("head", "layer")  # objective.scope
LAYER_SETS = ("embedding", "all")  # objective.layers
TARGETS = ("attention", "embedding_prior")  # objective.barrier_target
NOISE_MODES = ("absolute", "relative")  # objective.train_noise_mode


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
    if cfg.barrier_target not in TARGETS:
        raise UserError(f"objective.barrier_target={cfg.barrier_target!r}; expected one of "
                        f"{list(TARGETS)}")
    if not isinstance(cfg.prior_dim, int) or cfg.prior_dim < 0:
        raise UserError(f"objective.prior_dim={cfg.prior_dim!r} must be an integer >= 0 (0: the "
                        "full d_model, no projection)")
    if cfg.penalty not in penalties.PENALTIES:
        raise UserError(f"objective.penalty={cfg.penalty!r}; expected one of "
                        f"{list(penalties.PENALTIES)}")
    if not cfg.penalty_cap > 0 or not cfg.margin_tau > 0:
        raise UserError(f"objective.penalty_cap={cfg.penalty_cap} and objective.margin_tau="
                        f"{cfg.margin_tau} must be positive")
    if not 0 < cfg.small_gain_knee < 1:
        raise UserError(f"objective.small_gain_knee={cfg.small_gain_knee} must be in (0, 1)")
    if cfg.train_noise_sigma < 0 or cfg.train_noise_mode not in NOISE_MODES:
        raise UserError(f"objective.train_noise_sigma={cfg.train_noise_sigma} must be >= 0 and "
                        f"objective.train_noise_mode={cfg.train_noise_mode!r} one of "
                        f"{list(NOISE_MODES)}")
    if cfg.fixed_noise_scale < 0:
        raise UserError(f"objective.fixed_noise_scale={cfg.fixed_noise_scale} must be >= 0 "
                        "(0: learned)")


def prior_width(objective_cfg, model_cfg) -> int:
    """The embedding prior's width p for ``GPT(prior_width=...)``: 0 without the prior, else
    ``objective.prior_dim`` (0 meaning the full d_model, no projection)."""
    if objective_cfg.barrier_target != "embedding_prior":
        return 0
    return objective_cfg.prior_dim or model_cfg.d_model


def barrier_positions(batch: int, num_tokens: int, fraction: float, key: jax.Array | None,
                      sampling: str = "per_sequence", first: int = 0):
    """Uniformly random subsets of n = round(fraction (T - first)) of the positions
    first .. T - 1, sorted, or None for all (no key, or ``fraction`` 1).

    "per_sequence": (B, n), one independent subset per sequence; "shared": (n,) for all.
    """
    if key is None or fraction >= 1.0:
        return None
    available = num_tokens - first
    count = max(1, round(fraction * available))

    def subset(subset_key):
        return first + jnp.sort(jax.random.choice(subset_key, available, (count,),
                                                  replace=False))

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


def penalty_term(stats: dict, cfg, *, head: bool) -> tuple[jax.Array, dict]:
    """mean over layers and tokens of the penalty b_t (``objective.penalty``), and the
    diagnostics that go with it. ``head``: the blocks are per head, (..., H, n), and a token's
    penalty is the sum of its heads'; else (..., n)."""
    prefix = "head_" if head else ""
    per_block = penalties.penalty(cfg.penalty, stats, eps=cfg.barrier_eps, cap=cfg.penalty_cap,
                                  tau=cfg.margin_tau, knee=cfg.small_gain_knee, prefix=prefix)
    per_block = jnp.maximum(per_block, cfg.barrier_floor)
    per_token = jnp.sum(per_block, axis=-2) if head else per_block
    diagnostics = {}
    if prefix + "sign" in stats:
        sign, logabsdet = stats[prefix + "sign"], stats[prefix + "logdet"]
        diagnostics.update(
            infeasible_tokens=barrier.infeasible_count(sign),
            infeasible_fraction=jnp.mean(barrier.infeasible(sign).astype(jnp.float32)),
            logdet_min=jnp.min(jnp.where(sign > 0, logabsdet, -jnp.inf)),  # -inf: infeasible
            logdet_mean=jnp.mean(logabsdet))
    if prefix + "margin" in stats:
        diagnostics["margin_min"] = jnp.min(stats[prefix + "margin"])
    if prefix + "gain" in stats:
        diagnostics["gain_max"] = jnp.max(stats[prefix + "gain"])
    active = penalties.active(cfg.penalty, stats, cap=cfg.penalty_cap, tau=cfg.margin_tau,
                              knee=cfg.small_gain_knee, prefix=prefix)
    if active is not None:
        diagnostics["active_fraction"] = jnp.mean(active.astype(jnp.float32))
    return jnp.mean(per_token), diagnostics


def prior_term(
    residual_sq: jax.Array, log_noise_scale: jax.Array, dim: int, cfg,
    batch_tokens: int | None = None,
) -> tuple[jax.Array, dict]:
    """mean_{l,t}[||e||^2 / (2 sigma_l^2) + d log sigma_l] plus the weak hyperprior.

    residual_sq: (L', B, T) squared residual norms of the layers in the layer set (one
    "layer" for the embedding prior). sigma_l is ``objective.fixed_noise_scale`` when that is
    positive (no hyperprior then), else learned: exp(``log_noise_scale``). The hyperprior is
    counted once per training batch: divided by ``batch_tokens``, the whole batch's token
    count (default: this one's; a microbatch passes its batch's).
    """
    num_stat_layers = residual_sq.shape[0]
    if cfg.fixed_noise_scale > 0:
        log_sigma = jnp.full((num_stat_layers,), math.log(cfg.fixed_noise_scale), jnp.float32)
        hyperprior = 0.0
    else:
        log_sigma = at_least_float32(log_noise_scale[:num_stat_layers])  # "embedding": first
        hyperprior = jnp.sum((log_sigma / cfg.hyperprior_scale) ** 2) / 2
    per_token = (residual_sq * jnp.exp(-2 * log_sigma)[:, None, None] / 2
                 + dim * log_sigma[:, None, None])
    tokens_per_batch = batch_tokens or residual_sq.shape[1] * residual_sq.shape[2]
    diagnostics = {"noise_scale": jnp.exp(log_sigma), "residual_rms": jnp.sqrt(
        jnp.mean(residual_sq) / dim)}
    return jnp.mean(per_token) + hyperprior / tokens_per_batch, diagnostics


def map_objective(model, inputs, targets, cfg, *, dropout_key=None,
                  barrier_weight: float = 1.0,
                  batch_tokens: int | None = None) -> tuple[jax.Array, dict]:
    """The MAP loss of ``model`` on a batch ``inputs, targets: (B, T)``: (loss, aux).

    A training step passes ``dropout_key``: it draws the dropout, the barrier's positions
    (``barrier_fraction`` < 1) and the training noise on the embeddings
    (``train_noise_sigma`` > 0). Without it (evaluation) everything is exact and clean.

    ``barrier_weight`` multiplies lambda_m (a Python float, fixed per compiled step): 1 on
    every step by default; the lazy barrier's steps carry 1/q or 0 (``steps.barrier_weights``),
    and a step with weight 0 is compiled without the Jacobian work and reports no barrier.

    ``batch_tokens``: the token count of the training batch this one is a microbatch of
    (see ``accumulation.py``); by default this batch's.
    """
    batch, num_tokens = inputs.shape
    on_prior = cfg.barrier_target == "embedding_prior"
    with_barrier = cfg.lambda_m > 0 and barrier_weight > 0 and (num_tokens > 1 or not on_prior)
    reads = penalties.SINGULAR_VALUE_PENALTIES.get(cfg.penalty, "logdet")
    position_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    x0 = model.embed(inputs)
    aux = {}
    prior_stats = {}
    if on_prior and (with_barrier or cfg.lambda_s > 0):
        # The first position has no past (J_1 = I): the penalty's mean is over t >= 2.
        positions = barrier_positions(batch, num_tokens, cfg.barrier_fraction, position_key,
                                      cfg.barrier_sampling, first=1)
        if positions is None:
            positions = jnp.arange(1, max(num_tokens, 2))
        prior_stats = model.prior(x0, positions=positions,
                                  logdets=with_barrier and reads == "logdet",
                                  margins=with_barrier and reads == "margin",
                                  gains=with_barrier and reads == "gain", gram=True)
    x = x0
    if cfg.train_noise_sigma > 0 and dropout_key is not None:
        noise = jax.random.normal(jax.random.fold_in(dropout_key, 3), x0.shape, x0.dtype)
        x = add_embedding_noise(x0, noise, cfg.train_noise_sigma,
                                cfg.train_noise_mode == "relative")
    on_attention = with_barrier and not on_prior
    record = Record(scope=cfg.scope if on_attention else "none",
                    logdets=reads == "logdet", margins=on_attention and reads == "margin",
                    gains=on_attention and reads == "gain", gram=True,
                    layers=cfg.layers, residuals=cfg.lambda_s > 0 and not on_prior,
                    positions=barrier_positions(batch, num_tokens, cfg.barrier_fraction,
                                                position_key, cfg.barrier_sampling)
                    if on_attention else None, chunk_size=cfg.chunk_size)
    logits, stats = model.from_embeddings(x, dropout_key=dropout_key, record=record)
    ce = cross_entropy(logits, targets)
    loss = ce
    aux.update(ce=ce, bpc=ce / math.log(2),
               embedding_rms=jnp.sqrt(jnp.mean(jnp.square(at_least_float32(x0)))))
    if cfg.lambda_m > 0:
        aux["barrier_weight"] = jnp.float32(barrier_weight)
    if with_barrier:
        barrier_value, diagnostics = penalty_term(
            prior_stats if on_prior else stats, cfg, head=not on_prior and cfg.scope == "head")
        loss = loss + cfg.lambda_m * barrier_weight * barrier_value
        aux.update(barrier=barrier_value, **diagnostics)
    if cfg.lambda_s > 0:
        if on_prior:
            prior_value, diagnostics = prior_term(
                prior_stats["residual_sq"][None], model.prior.log_noise_scale[...][None],
                model.prior.width, cfg, batch_tokens)
        else:
            prior_value, diagnostics = prior_term(
                stats["residual_sq"], model.log_noise_scale[...], model.token_embed.features,
                cfg, batch_tokens)
        loss = loss + cfg.lambda_s * prior_value
        aux.update(prior=prior_value, **diagnostics)
    aux["loss"] = loss
    return loss, aux


def combine_microbatch_aux(aux: dict) -> dict:
    """Merge ``map_objective``'s metrics stacked over equal microbatches (leading axis) into
    the whole batch's: counts add up, minima stay minima, maxima maxima, RMS values combine
    as RMS, and every other metric (a mean over equal-size microbatches, or the same in each)
    averages."""
    rms = lambda x, axis: jnp.sqrt(jnp.mean(x**2, axis=axis))  # noqa: E731
    reductions = {"infeasible_tokens": jnp.sum, "logdet_min": jnp.min, "margin_min": jnp.min,
                  "gain_max": jnp.max, "residual_rms": rms, "embedding_rms": rms}
    return {name: reductions.get(name, jnp.mean)(value, axis=0) for name, value in aux.items()}
