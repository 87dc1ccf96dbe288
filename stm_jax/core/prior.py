"""The embedding prior: a separate, strictly causal attention prior over the raw embeddings.

math.md section 9 (the port's reading). For one sequence of layer-0 embeddings
``x0: (T, d)`` (token + position embedding, before any LayerNorm):

    u_t = x0_t P                   latents in R^p (P: (d, p); without it, u_t = x0_t, p = d)
    z_ts = (u_t W_Q) . (u_s W_K) / sqrt(p),   a_ts = softmax over s < t of z_ts
    mu_t = sum_{s<t} a_ts u_s      (values are the latents themselves), mu_1 = 0
    e_t = u_t - mu_t

Strict causality (s < t) makes the diagonal Jacobian block exact and small:

    J_t = d e_t / d u_t = I_p - Sigma_t A^T,   z_ts = u_t A u_s^T,   A = W_Q W_K^T / sqrt(p)
    Sigma_t = sum_{s<t} a_ts (u_s - ubar_t)(u_s - ubar_t)^T,   ubar_t = mu_t

The first position has no past: mu_1 = 0, so e_1 = u_1 and J_1 = I (det 1, every penalty 0);
the penalty's mean is taken over t >= 2 (the objective draws its positions there).
Everything is a pure function of ``(params, x0)``; batch with ``jax.vmap``.

Parameter layout (row-vector convention, as the model's weights): ``{"wq": (p, p),
"wk": (p, p)}`` and, with a projection, ``"proj": (d, p)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from stm_jax.core import logdet
from stm_jax.core.attention import extreme_singular_value


class PriorMoments(NamedTuple):
    """What the prior's blocks are built from, for one sequence (T tokens, width p)."""

    u: jax.Array  # (T, p) the latents
    attn: jax.Array  # (T, T) strictly causal weights a_ts (row 0 all zero)
    mean: jax.Array  # (T, p) mu_t = ubar_t (0 at t = 0)


def latents(params: dict, x0: jax.Array) -> jax.Array:
    """u = x0 P with the projection, else x0 itself."""
    return x0 @ params["proj"] if "proj" in params else x0


def prior_moments(params: dict, x0: jax.Array) -> PriorMoments:
    """Latents, strictly causal attention weights and means for ``x0: (T, d)``."""
    u = latents(params, x0)
    num_tokens, width = u.shape
    softmax_dtype = jnp.promote_types(u.dtype, jnp.float32)
    scores = ((u @ params["wq"]) @ (u @ params["wk"]).T).astype(softmax_dtype) / jnp.sqrt(width)
    past = jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool), k=-1)
    # Row 0 has no past: a softmax over nothing would be NaN, so it gets weights of 0.
    scores = jnp.where(past, scores, -jnp.inf)
    has_past = jnp.arange(num_tokens) > 0
    safe = jnp.where(has_past[:, None], scores, 0.0)
    attn = jnp.where(past, jax.nn.softmax(safe, axis=-1), 0.0).astype(u.dtype)
    return PriorMoments(u=u, attn=attn, mean=attn @ u)


def prior_residual(params: dict, x0: jax.Array) -> jax.Array:
    """e = u - mu, (T, p): the map whose diagonal Jacobian blocks are J_t (the oracle)."""
    m = prior_moments(params, x0)
    return m.u - m.mean


def self_maps(params: dict, m: PriorMoments, positions: jax.Array | None = None) -> jax.Array:
    """M_t = Sigma_t A^T with J_t = I_p - M_t, for every token or ``positions``: (n, p, p)."""
    attn, mean = m.attn, m.mean
    if positions is not None:
        attn, mean = attn[positions], mean[positions]
    width = m.u.shape[-1]
    second = jnp.einsum("ns,si,sj->nij", attn, m.u, m.u)
    covariance = second - mean[:, :, None] * mean[:, None, :]  # Sigma_t
    coupling = params["wk"] @ params["wq"].T / jnp.sqrt(width)  # A^T
    return covariance @ coupling


def prior_stats(params: dict, x0: jax.Array, *, positions: jax.Array | None = None,
                logdets: bool = True, margins: bool = False, gains: bool = False,
                gram: bool = False) -> dict:
    """Per-token statistics of the prior's blocks J_t = I_p - M_t, for all or ``positions``:
    "sign" and "logdet" (log|det J_t|), "margin" sigma_min(J_t), "gain" ||M_t||_2, each (n,),
    and "residual_sq" ||e_t||^2 of every token, (T,). ``gram``: as
    ``attention.extreme_singular_value``."""
    m = prior_moments(params, x0)
    stats = {"residual_sq": jnp.sum(jnp.square(m.u - m.mean), axis=-1)}
    if not (logdets or margins or gains):
        return stats
    self_map = self_maps(params, m, positions)
    self_map = self_map.astype(jnp.promote_types(self_map.dtype, jnp.float32))
    jac = jnp.eye(self_map.shape[-1], dtype=self_map.dtype) - self_map
    if logdets:
        stats["sign"], stats["logdet"] = logdet.slogdet(jac)
    if margins:
        stats["margin"] = extreme_singular_value(jac, "min", gram)
    if gains:
        stats["gain"] = extreme_singular_value(self_map, "max", gram)
    return stats


def init_prior_params(key: jax.Array, d: int, width: int, *, project: bool,
                      dtype=jnp.float32) -> dict:
    """Gaussian weights with std 1/sqrt(fan_in) (LeCun normal, the scale of PyTorch's
    nn.Linear that the port uses); ``project`` adds P: (d, width)."""
    keys = jax.random.split(key, 3)
    normal = lambda k, shape: jax.random.normal(k, shape, dtype) / jnp.sqrt(shape[0])  # noqa: E731
    params = {"wq": normal(keys[0], (width, width)), "wk": normal(keys[1], (width, width))}
    if project:
        params["proj"] = normal(keys[2], (d, width))
    return params
