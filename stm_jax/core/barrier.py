"""The smooth log-barrier on det J_t, infeasible-token counts and support-token selection.

math.md section 3. With x = det J_t the barrier is

    b(x) = -log x                                            x >= eps
    b(x) = -log eps - (x - eps)/eps + (x - eps)^2/(2 eps^2)  -1 <= x < eps   (C^2 at eps)
    b(x) = b(-1) + |b'(-1)| log|x|                           x < -1          (C^1 at -1)

The last piece continues the quadratic linearly in log|x| (choice): it is computed from
``log|det|`` directly, so a determinant too large to represent still gives a finite value and
a bounded gradient, and it keeps b decreasing in x. It is evaluated from ``(sign, log|det|)``
as returned by ``slogdet``, so nothing overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-2


def _quadratic(x: jax.Array, eps: float) -> jax.Array:
    return -jnp.log(eps) - (x - eps) / eps + (x - eps) ** 2 / (2 * eps**2)


def _quadratic_slope(x: jax.Array, eps: float) -> jax.Array:
    return -1.0 / eps + (x - eps) / eps**2


def smooth_log_barrier(
    sign: jax.Array, logabsdet: jax.Array, eps: float = DEFAULT_EPS
) -> jax.Array:
    """b(det J) elementwise from slogdet output; finite value and gradient for every input.

    ``sign == 0`` (a singular block, log|det| = -inf) is treated as det = 0.
    """
    if not eps > 0:
        raise ValueError(f"barrier eps must be positive, got {eps}")
    logabsdet = jnp.asarray(logabsdet)
    dtype = jnp.promote_types(logabsdet.dtype, jnp.float32)
    logabsdet, sign = logabsdet.astype(dtype), jnp.asarray(sign).astype(dtype)
    log_eps = jnp.log(jnp.asarray(eps, dtype))
    use_log = (sign > 0) & (logabsdet >= log_eps)
    use_tail = (sign < 0) & (logabsdet > 0)  # x < -1
    use_quadratic = ~(use_log | use_tail)
    # Each branch sees only inputs it is valid for, so unselected branches give no inf/NaN
    # gradients through jnp.where ("double where").
    safe_log = jnp.where(use_log, logabsdet, 0.0)
    safe_small = jnp.where(use_quadratic & (sign != 0), logabsdet, -jnp.inf)  # x in [-1, eps)
    x_small = jnp.where(use_quadratic, sign * jnp.exp(safe_small), 0.0)
    safe_tail = jnp.where(use_tail, logabsdet, 0.0)
    tail = _quadratic(-1.0, eps) + jnp.abs(_quadratic_slope(-1.0, eps)) * safe_tail
    return jnp.where(use_log, -safe_log, jnp.where(use_tail, tail, _quadratic(x_small, eps)))


def barrier_of_det(det: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """b(x) for determinants given directly (tests, plots); finite gradient at x = 0 too."""
    det = jnp.asarray(det)
    # jnp.where rather than clip: clip's gradient is halved at the joins.
    quadratic_x = jnp.where((det >= -1.0) & (det < eps), det, 0.0)
    log_x = jnp.log(jnp.where(det >= eps, det, 1.0))
    tail_log = jnp.log(jnp.where(det < -1.0, -det, 1.0))
    tail = _quadratic(-1.0, eps) + jnp.abs(_quadratic_slope(-1.0, eps)) * tail_log
    return jnp.where(det >= eps, -log_x, jnp.where(det < -1.0, tail, _quadratic(quadratic_x, eps)))


def infeasible(sign: jax.Array) -> jax.Array:
    """Tokens whose determinant is not positive: they crossed the degeneracy boundary."""
    return sign <= 0


def infeasible_count(sign: jax.Array) -> jax.Array:
    """Number of tokens with det J_t <= 0 (counted, never silently dropped)."""
    return jnp.sum(infeasible(sign))


def support_tokens_threshold(margin: jax.Array, tau: float) -> jax.Array:
    """Boolean mask of the support tokens m_t <= tau (any shape, per layer and head alike)."""
    return margin <= tau


def support_tokens_bottom_k(margin: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest margins along the last (token) axis: (indices, mask).

    Works per sequence, per layer and per head by leading axes; ties go to earlier tokens.
    """
    num_tokens = margin.shape[-1]
    if not 1 <= k <= num_tokens:
        raise ValueError(f"bottom-k needs 1 <= k <= T={num_tokens}, got k={k}")
    _, indices = jax.lax.top_k(-margin, k)
    mask = jnp.zeros(margin.shape, bool)
    mask = jnp.put_along_axis(mask, indices, True, axis=-1, inplace=False)
    return indices, mask


def margin_quantiles(margin: jax.Array, qs=(0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)) -> dict:
    """Quantiles of a margin array (flattened) keyed 'q00', 'q05', ..."""
    values = jnp.quantile(jnp.ravel(margin), jnp.asarray(qs))
    return {f"q{round(q * 100):02d}": v for q, v in zip(qs, values, strict=True)}
