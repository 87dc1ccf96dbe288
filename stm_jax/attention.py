"""Causal self-attention as a probabilistic model, with exact per-token Jacobian blocks.

Everything here is a pure function of ``(params, u)`` for one sequence ``u: (T, d)``; batch
with ``jax.vmap``. The mathematics is in ``docs/math.md`` (sections 1-3). Notation:

    q_t^h = W_Q^h u_t, k_s^h = W_K^h u_s, v_s^h = W_V^h u_s         (p-vectors)
    a_ts^h = softmax_{s<=t}(q_t^h . k_s^h / sqrt(p)),  o_t^h = sum_s a_ts^h v_s^h
    out_t = sum_h W_O^h o_t^h,   e_t = u_t - out_t,   J_t = d e_t / d u_t   (d x d)

Parameter layout (``W_Q^h = wq[:, h, :].T`` and ``W_O^h = wo[h].T``)::

    params = {"wq": (d, H, p), "wk": (d, H, p), "wv": (d, H, p), "wo": (H, p, d)}

``det J_t`` is computed through the Sylvester reduction ``det(I_d - U G) = det(I_Hp - G U)``:
only ``p x p`` products of the weights (shared by all tokens) and per-token attention moments
enter, and the ``T d x T d`` Jacobian is never formed.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Scope = Literal["none", "head", "layer", "both"]
SCOPES = ("none", "head", "layer", "both")


class AttentionStats(NamedTuple):
    """Per-token Jacobian statistics of one attention layer (fields are None when not asked)."""

    logdet: jax.Array | None = None  # (T,) log|det J_t|, whole layer ("layer" scope)
    sign: jax.Array | None = None  # (T,) sign of det J_t
    head_logdet: jax.Array | None = None  # (H, T) log|det(I_p - B_t^hh)| ("head" scope)
    head_sign: jax.Array | None = None  # (H, T)


class Moments(NamedTuple):
    """Attention quantities that the Jacobian blocks are built from (head-major)."""

    q: jax.Array  # (H, T, p)
    k: jax.Array  # (H, T, p)
    v: jax.Array  # (H, T, p)
    attn: jax.Array  # (H, T, T) causal attention weights a_ts
    o: jax.Array  # (H, T, p) attention output per head
    kbar: jax.Array  # (H, T, p) attention-weighted mean key


def attention_moments(params: dict, u: jax.Array) -> Moments:
    """Queries, keys, values, causal softmax weights and weighted means for ``u: (T, d)``."""
    q = jnp.einsum("td,dhp->htp", u, params["wq"])
    k = jnp.einsum("td,dhp->htp", u, params["wk"])
    v = jnp.einsum("td,dhp->htp", u, params["wv"])
    num_tokens, head_dim = u.shape[0], q.shape[-1]
    # Softmax in float32 at least, even when the matmuls run in bfloat16.
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("htp,hsp->hts", q, k).astype(softmax_dtype) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    attn = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    o = jnp.einsum("hts,hsp->htp", attn, v)
    kbar = jnp.einsum("hts,hsp->htp", attn, k)
    return Moments(q=q, k=k, v=v, attn=attn, o=o, kbar=kbar)


def attention_output(params: dict, m: Moments) -> jax.Array:
    """``out_t = sum_h W_O^h o_t^h``, shape (T, d)."""
    return jnp.einsum("htp,hpd->td", m.o, params["wo"])


def weight_products(params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """P_Q, P_K, P_V with ``P_X[h, g] = W_X^h W_O^g`` (p x p), shape (H, H, p, p).

    These are the only places the d-dimensional weights enter the determinant; they are
    shared by every token, so the per-token work is independent of d.
    """
    product = lambda w: jnp.einsum("dhi,gjd->hgij", w, params["wo"])  # noqa: E731
    return product(params["wq"]), product(params["wk"]), product(params["wv"])


def _diag(x: jax.Array) -> jax.Array:
    """(H, T, T) -> (H, T): the self weight a_tt."""
    return jnp.diagonal(x, axis1=-2, axis2=-1)


def layer_block_matrix(m: Moments, pq: jax.Array, pk: jax.Array, pv: jax.Array) -> jax.Array:
    """B_t of math.md section 2 for every token: (T, H p, H p), with det J_t = det(I - B_t).

    Block (h, g) is [C_t^h P_Q^hg + a_tt^h (v_t^h - o_t^h)(q_t^h)^T P_K^hg] / sqrt(p)
    + a_tt^h P_V^hg, with C_t^h = sum_s a_ts^h v_s^h (k_s^h)^T - o_t^h (kbar_t^h)^T.
    """
    num_heads, num_tokens, head_dim = m.q.shape
    a_self = _diag(m.attn)  # (H, T)
    k_proj = jnp.einsum("hsi,hgij->hsgj", m.k, pq)  # k_s^T P_Q^hg
    kbar_proj = jnp.einsum("hti,hgij->htgj", m.kbar, pq)
    q_proj = jnp.einsum("hti,hgij->htgj", m.q, pk)
    # sum_s a_ts v_s (P_Q^T k_s)^T as one matmul over s.
    cross = jnp.einsum("hts,hsi,hsgj->thigj", m.attn, m.v, k_proj)
    cross -= jnp.einsum("hti,htgj->thigj", m.o, kbar_proj)
    self_term = jnp.einsum("ht,hti,htgj->thigj", a_self, m.v - m.o, q_proj)
    value_term = jnp.einsum("ht,higj->thigj", a_self, jnp.moveaxis(pv, 2, 1))
    blocks = (cross + self_term) / jnp.sqrt(head_dim) + value_term
    size = num_heads * head_dim
    return blocks.reshape(num_tokens, size, size)


def head_block_matrix(m: Moments, pq: jax.Array, pk: jax.Array, pv: jax.Array) -> jax.Array:
    """The diagonal blocks B_t^hh only: (H, T, p, p). Cheaper than the whole B_t."""
    head_dim = m.q.shape[-1]
    diag_heads = lambda x: jnp.einsum("hhij->hij", x)  # noqa: E731
    pq, pk, pv = diag_heads(pq), diag_heads(pk), diag_heads(pv)
    a_self = _diag(m.attn)
    k_proj = jnp.einsum("hsi,hij->hsj", m.k, pq)
    kbar_proj = jnp.einsum("hti,hij->htj", m.kbar, pq)
    q_proj = jnp.einsum("hti,hij->htj", m.q, pk)
    cross = jnp.einsum("hts,hsi,hsj->htij", m.attn, m.v, k_proj)
    cross -= jnp.einsum("hti,htj->htij", m.o, kbar_proj)
    self_term = jnp.einsum("ht,hti,htj->htij", a_self, m.v - m.o, q_proj)
    value_term = a_self[:, :, None, None] * pv[:, None]
    return (cross + self_term) / jnp.sqrt(head_dim) + value_term


def _slogdet_identity_minus(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sign and log|det(I - b)| over the last two axes."""
    # Determinants in float32 at least, even when the matmuls run in bfloat16.
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    eye = jnp.eye(b.shape[-1], dtype=b.dtype)
    sign, logabsdet = jnp.linalg.slogdet(eye - b)
    return sign, logabsdet


def jacobian_stats(params: dict, m: Moments, scope: Scope = "both") -> AttentionStats:
    """Per-token log|det J_t| ("layer"), per-head diagonal-block log-dets ("head"), or both."""
    if scope not in SCOPES:
        raise ValueError(f"unknown Jacobian scope {scope!r}; expected one of {SCOPES}")
    if scope == "none":
        return AttentionStats()
    pq, pk, pv = weight_products(params)
    stats = {}
    if scope in ("layer", "both"):
        stats["sign"], stats["logdet"] = _slogdet_identity_minus(layer_block_matrix(m, pq, pk, pv))
    if scope in ("head", "both"):
        head_sign, head_logdet = _slogdet_identity_minus(head_block_matrix(m, pq, pk, pv))
        stats["head_sign"], stats["head_logdet"] = head_sign, head_logdet
    return AttentionStats(**stats)


def causal_self_attention(
    params: dict, u: jax.Array, *, scope: Scope = "both"
) -> tuple[jax.Array, AttentionStats]:
    """Multi-head causal self-attention of ``u: (T, d)`` and its Jacobian statistics.

    Args:
      params: {"wq": (d, H, p), "wk": (d, H, p), "wv": (d, H, p), "wo": (H, p, d)}.
      u: the layer's input embeddings, (T, d).
      scope: which log-determinants to compute: "layer" (exact det J_t), "head" (per-head
        diagonal blocks), "both" (default), or "none" to skip the Jacobian work entirely.

    Returns:
      out: (T, d), sum_h W_O^h o_t^h with the self-term s = t included.
      stats: AttentionStats; fields not asked for are None.
    """
    m = attention_moments(params, u)
    return attention_output(params, m), jacobian_stats(params, m, scope)


# ---------------------------------------------------------------------------------------
# Margins to degeneracy: sigma_min of the d x d block (Eckart-Young distance to singularity).


def token_jacobian_factors(params: dict, m: Moments) -> tuple[jax.Array, jax.Array]:
    """U and G with J_t^h = I_d - U^h G_t^h.

    U: (H, d, p), U^h = W_O^h.  G: (H, T, p, d), G_t^h = d o_t^h / d u_t (math.md section 2).
    """
    head_dim = m.q.shape[-1]
    a_self = _diag(m.attn)
    cov = jnp.einsum("hts,hsi,hsj->htij", m.attn, m.v, m.k)
    cov -= jnp.einsum("hti,htj->htij", m.o, m.kbar)  # C_t^h
    wq_h = jnp.moveaxis(params["wq"], 1, 0)  # (H, d, p): W_Q^h transposed
    wk_h = jnp.moveaxis(params["wk"], 1, 0)
    wv_h = jnp.moveaxis(params["wv"], 1, 0)
    through_query = jnp.einsum("htij,hdj->htid", cov, wq_h)
    through_key = jnp.einsum("ht,hti,htj,hdj->htid", a_self, m.v - m.o, m.q, wk_h)
    through_value = a_self[:, :, None, None] * jnp.swapaxes(wv_h, 1, 2)[:, None]
    g = (through_query + through_key) / jnp.sqrt(head_dim) + through_value
    u_factor = jnp.swapaxes(params["wo"], 1, 2)  # (H, d, p)
    return u_factor, g


def sigma_min_identity_minus_low_rank(left: jax.Array, right: jax.Array) -> jax.Array:
    """Smallest singular value of ``I_d - left @ right.T`` for left, right: (d, r).

    When 2r < d the map is the identity on the orthogonal complement of span[left, right]
    and leaves that span invariant, so its singular values are those of a 2r x 2r matrix
    plus ones: sigma_min = min(1, sigma_min(Q^T J Q)) for an orthonormal basis Q of the span.
    """
    dim, rank = left.shape
    if 2 * rank >= dim:
        jac = jnp.eye(dim, dtype=left.dtype) - left @ right.T
        return jnp.linalg.svd(jac, compute_uv=False)[-1]
    basis, _ = jnp.linalg.qr(jnp.concatenate([left, right], axis=1))
    reduced = jnp.eye(2 * rank, dtype=left.dtype) - (basis.T @ left) @ (right.T @ basis)
    return jnp.minimum(jnp.linalg.svd(reduced, compute_uv=False)[-1], 1.0)


def margins(params: dict, u: jax.Array, *, scope: Literal["layer", "head"] = "layer") -> jax.Array:
    """Margin to degeneracy m_t = sigma_min(J_t) per token: (T,) for "layer", (H, T) for "head".

    "head" gives sigma_min(I_d - W_O^h G_t^h), the margin of head h acting alone. This costs a
    singular value decomposition per token; use it for evaluation, not in the training loss.
    """
    m = attention_moments(params, u)
    u_factor, g = token_jacobian_factors(params, m)  # (H, d, p), (H, T, p, d)
    if scope == "head":
        per_token = jax.vmap(sigma_min_identity_minus_low_rank, in_axes=(None, 0))
        return jax.vmap(per_token)(u_factor, jnp.swapaxes(g, -1, -2))
    if scope != "layer":
        raise ValueError(f"unknown margin scope {scope!r}; expected 'layer' or 'head'")
    num_heads, dim, head_dim = u_factor.shape
    left = jnp.moveaxis(u_factor, 0, 1).reshape(dim, num_heads * head_dim)
    right = jnp.moveaxis(g, 0, 1).reshape(-1, num_heads * head_dim, dim)  # (T, Hp, d)
    right = jnp.swapaxes(right, -1, -2)
    return jax.vmap(sigma_min_identity_minus_low_rank, in_axes=(None, 0))(left, right)


def init_attention_params(
    key: jax.Array, d: int, num_heads: int, head_dim: int, *, scale: float = 1.0, dtype=jnp.float32
) -> dict:
    """Gaussian weights with std scale/sqrt(fan_in); a larger scale gives negative determinants."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    normal = lambda k, shape, fan_in: (  # noqa: E731
        scale * jax.random.normal(k, shape, dtype) / jnp.sqrt(fan_in).astype(dtype)
    )
    shape_in = (d, num_heads, head_dim)
    return {
        "wq": normal(kq, shape_in, d),
        "wk": normal(kk, shape_in, d),
        "wv": normal(kv, shape_in, d),
        "wo": normal(ko, (num_heads, head_dim, d), num_heads * head_dim),
    }
