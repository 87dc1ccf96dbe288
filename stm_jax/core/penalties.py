"""Penalties on a token's Jacobian block J_t = I - M_t, one value per block (math.md section 10).

* ``log_barrier``: the smooth -log det J_t of ``barrier.smooth_log_barrier``; unbounded below.
* ``abs_log_capped``: min(-log|det J_t|, cap), the sign ignored (the port's); unbounded below.
* ``margin_hinge``: relu(tau - sigma_min(J_t))^2; 0 for a margin of at least tau.
* ``small_gain``: phi(||M_t||_2), phi(r) = -log(1 - r) below a knee r0, then its second-order
  Taylor polynomial at r0 (finite for every r); 0 at M_t = 0.
* ``logdet_squared``: (log|det J_t|)^2; 0 at det J_t = 1, from both sides.

The first three read (sign, log|det|), the hinge the margin sigma_min(J_t), the small gain
||M_t||_2. Each is elementwise, so the barrier's estimators (a subset of positions, a fraction
of steps) stay unbiased for its mean. ``small_gain`` keeps the invertible-residual condition
||M_t|| < 1, which implies sigma_min(J_t) >= 1 - ||M_t|| > 0 and det J_t > 0, without
rewarding expansion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stm_jax.core import barrier

PENALTIES = ("log_barrier", "abs_log_capped", "margin_hinge", "small_gain", "logdet_squared")
DETERMINANT_PENALTIES = ("log_barrier", "abs_log_capped", "logdet_squared")
SINGULAR_VALUE_PENALTIES = {"margin_hinge": "margin", "small_gain": "gain"}  # what each reads


def abs_log_capped(logabsdet: jax.Array, cap: float) -> jax.Array:
    """min(-log|det J|, cap): the port's -log|det| clipped where det J -> 0 (cap 30 there)."""
    return jnp.minimum(-logabsdet, cap)


def logdet_squared(logabsdet: jax.Array) -> jax.Array:
    """(log|det J|)^2: pulls det J towards 1 from both sides."""
    return jnp.square(logabsdet)


def margin_hinge(margin: jax.Array, tau: float) -> jax.Array:
    """relu(tau - sigma_min(J))^2: zero for tokens with a margin of at least tau."""
    return jnp.square(jax.nn.relu(tau - margin))


def small_gain(gain: jax.Array, knee: float) -> jax.Array:
    """phi(||M||_2) with phi(r) = -log(1 - r) for r < knee, continued by its second-order
    Taylor polynomial at the knee (C^2 there, finite and increasing for every r >= 0)."""
    if not 0 < knee < 1:
        raise ValueError(f"the small-gain knee must be in (0, 1), got {knee}")
    below = gain < knee
    safe = jnp.where(below, gain, 0.0)  # no log(1 - r) of r >= 1 in the unselected branch
    offset = gain - knee
    taylor = (-jnp.log1p(-knee) + offset / (1 - knee) + offset**2 / (2 * (1 - knee) ** 2))
    return jnp.where(below, -jnp.log1p(-safe), taylor)


def penalty(name: str, stats: dict, *, eps: float = barrier.DEFAULT_EPS, cap: float = 30.0,
            tau: float = 0.5, knee: float = 0.9, prefix: str = "") -> jax.Array:
    """Penalty ``name`` of every block in ``stats`` (arrays keyed ``prefix + "sign"``,
    ``"logdet"``, ``"margin"`` or ``"gain"``, as ``attention`` and ``prior`` name them)."""
    get = lambda key: stats[prefix + key]  # noqa: E731
    if name == "log_barrier":
        return barrier.smooth_log_barrier(get("sign"), get("logdet"), eps)
    if name == "abs_log_capped":
        return abs_log_capped(get("logdet"), cap)
    if name == "logdet_squared":
        return logdet_squared(get("logdet"))
    if name == "margin_hinge":
        return margin_hinge(get("margin"), tau)
    if name == "small_gain":
        return small_gain(get("gain"), knee)
    raise ValueError(f"unknown penalty {name!r}; expected one of {PENALTIES}")


def active(name: str, stats: dict, *, cap: float = 30.0, tau: float = 0.5, knee: float = 0.9,
           prefix: str = "") -> jax.Array | None:
    """Which blocks are at the penalty's constraint: a margin below tau, a gain beyond the
    knee, a capped log-determinant; None for the penalties without one."""
    if name == "margin_hinge":
        return stats[prefix + "margin"] < tau
    if name == "small_gain":
        return stats[prefix + "gain"] > knee
    if name == "abs_log_capped":
        return -stats[prefix + "logdet"] >= cap
    return None
