"""Causal self-attention as a probabilistic model, with exact per-token Jacobian blocks.

Everything here is a pure function of ``(params, u)`` for one sequence ``u: (T, d)``; batch
with ``jax.vmap``. The mathematics is in ``docs/math.md`` (sections 1-3). Notation:

    q_t^h = W_Q^h u_t, k_s^h = W_K^h u_s, v_s^h = W_V^h u_s         (p-vectors)
    a_ts^h = softmax_{s<=t}(q_t^h . k_s^h / sqrt(p)),  o_t^h = sum_s a_ts^h v_s^h
    out_t = sum_h W_O^h o_t^h,   e_t = u_t - out_t,   J_t = d e_t / d u_t   (d x d)

Parameter layout (``W_Q^h = wq[:, h, :].T`` and ``W_O^h = wo[h].T``)::

    params = {"wq": (d, H, p), "wk": (d, H, p), "wv": (d, H, p), "wo": (H, p, d)}

and optionally the biases of GPT-2-style layers, ``"bq", "bk", "bv": (H, p)`` and
``"bo": (d,)``, added to q, k, v and out. The Jacobian formulas below need no change for them
(math.md section 2, "Biases"): they are written in the moments (q, k, v, o, kbar), which are
computed with the biases; a key bias adds q_t . b_k to every score of row t and cancels in the
softmax and in C_t, a value bias cancels in C_t and in v_t - o_t, the output bias is a
constant, and the query bias is part of q_t, which the formulas use as it is.

``det J_t`` is computed through the Sylvester reduction ``det(I_d - U G) = det(I_Hp - G U)``:
only ``p x p`` products of the weights (shared by all tokens) and per-token attention moments
enter, and the ``T d x T d`` Jacobian is never formed.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from stm_jax.core import logdet

Scope = Literal["none", "head", "layer", "both"]
SCOPES = ("none", "head", "layer", "both")


class AttentionStats(NamedTuple):
    """Per-token Jacobian statistics of one attention layer (fields are None when not asked)."""

    logdet: jax.Array | None = None  # (T,) log|det J_t|, whole layer ("layer" scope)
    sign: jax.Array | None = None  # (T,) sign of det J_t
    head_logdet: jax.Array | None = None  # (H, T) log|det(I_p - B_t^hh)| ("head" scope)
    head_sign: jax.Array | None = None  # (H, T)
    margin: jax.Array | None = None  # (T,) sigma_min(J_t) (``with_margins``)
    head_margin: jax.Array | None = None  # (H, T) sigma_min(I_d - W_O^h G_t^h)
    gain: jax.Array | None = None  # (T,) ||M_t||_2 with J_t = I_d - M_t (``with_gains``)
    head_gain: jax.Array | None = None  # (H, T) ||W_O^h G_t^h||_2
    spectral_radius: jax.Array | None = None  # (T,) of M_t (``with_spectra``)
    eig_real_max: jax.Array | None = None  # (T,)
    eig_real_min: jax.Array | None = None  # (T,)


class Moments(NamedTuple):
    """Attention quantities that the Jacobian blocks are built from (head-major)."""

    q: jax.Array  # (H, T, p)
    k: jax.Array  # (H, T, p)
    v: jax.Array  # (H, T, p)
    attn: jax.Array  # (H, T, T) causal attention weights a_ts
    o: jax.Array  # (H, T, p) attention output per head
    kbar: jax.Array  # (H, T, p) attention-weighted mean key


def project(params: dict, u: jax.Array, name: str) -> jax.Array:
    """q, k or v (``name`` "q", "k", "v") of ``u: (T, d)`` per head, (H, T, p), bias included."""
    x = jnp.einsum("td,dhp->htp", u, params["w" + name])
    bias = params.get("b" + name)  # GPT-2-style layers only
    return x if bias is None else x + bias[:, None, :]


def attention_moments(params: dict, u: jax.Array) -> Moments:
    """Queries, keys, values, causal softmax weights and weighted means for ``u: (T, d)``."""
    q, k, v = (project(params, u, name) for name in ("q", "k", "v"))
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
    """``out_t = sum_h W_O^h o_t^h (+ b_O)``, shape (T, d)."""
    out = jnp.einsum("htp,hpd->td", m.o, params["wo"])
    return out if params.get("bo") is None else out + params["bo"]


def residual(params: dict, u: jax.Array, head: int | None = None) -> jax.Array:
    """e = u - out, the map whose diagonal Jacobian blocks are J_t (math.md section 1).

    With ``head``, only that head's contribution is subtracted: the map whose blocks are the
    per-head J_t^h. Used as the autodiff oracle in the tests and the derivation notebook.
    """
    m = attention_moments(params, u)
    if head is None:
        return u - attention_output(params, m)
    return u - m.o[head] @ params["wo"][head]  # b_O is a constant: no part of any J_t^h


def weight_products(params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """P_Q, P_K, P_V with ``P_X[h, g] = W_X^h W_O^g`` (p x p), shape (H, H, p, p).

    These are the only places the d-dimensional weights enter the determinant; they are
    shared by every token, so the per-token work is independent of d.
    """
    return _products_of(params, "dhi,gjd->hgij")


def head_weight_products(params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The diagonal blocks P_X[h, h] = W_X^h W_O^h only, shape (H, p, p): all that the
    "head" scope needs, at 1/H of the work of ``weight_products``."""
    return _products_of(params, "dhi,hjd->hij")


def _products_of(params: dict, spec: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """W_Q, W_K and W_V each contracted with W_O by the einsum ``spec``."""
    return tuple(jnp.einsum(spec, params[name], params["wo"]) for name in ("wq", "wk", "wv"))


def _diag(x: jax.Array) -> jax.Array:
    """(H, T, T) -> (H, T): the self weight a_tt."""
    return jnp.diagonal(x, axis1=-2, axis2=-1)


class QueryRows(NamedTuple):
    """The query-side quantities of the tokens whose Jacobian blocks are wanted (n of them)."""

    attn: jax.Array  # (H, n, T) their attention rows
    a_self: jax.Array  # (H, n) a_tt
    q: jax.Array  # (H, n, p)
    o: jax.Array  # (H, n, p)
    kbar: jax.Array  # (H, n, p)
    v_self: jax.Array  # (H, n, p) the token's own value v_t


def query_rows(m: Moments, positions: jax.Array | None = None) -> QueryRows:
    """Rows of every token, or of the token indices ``positions`` (n,) only."""
    if positions is None:
        return QueryRows(m.attn, _diag(m.attn), m.q, m.o, m.kbar, m.v)
    take = lambda x: jnp.take(x, positions, axis=1)  # noqa: E731
    attn = take(m.attn)
    # The rows' mean keys from their attention rows: the (H, T, p) kbar of every token is
    # then never formed (XLA drops it), which was a tenth of the estimator's extra time.
    kbar = jnp.einsum("hnt,htp->hnp", attn, m.k)
    return QueryRows(attn, m.attn[:, positions, positions], take(m.q), take(m.o), kbar,
                     take(m.v))


def _weighted_outer_sum(attn: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    """sum_s a_ts left_s right_s^T for every row t, as one matmul over s.

    attn: (H, n, T), left: (H, T, p), right: (H, T, r) -> (H, n, p, r). Either form the
    (T, p r) outer products of every key, or scale the keys' left vectors by each row's weights
    ((n, T, p)); whichever intermediate is smaller. With few rows (the barrier estimator) the
    second is n / r of the first. Both make forward and backward plain matrix products.
    """
    heads, num_keys, p = left.shape
    num_rows, width = attn.shape[1], right.shape[-1]
    if num_rows < width:
        scaled = attn[..., None, :] * jnp.swapaxes(left, 1, 2)[:, None]  # (H, n, p, T)
        return jnp.einsum("hnis,hsj->hnij", scaled, right)
    outer = (left[..., :, None] * right[..., None, :]).reshape(heads, num_keys, -1)
    return jnp.matmul(attn, outer).reshape(heads, num_rows, p, width)


def _block_rows(m: Moments, rows: QueryRows, pq, pk, pv) -> jax.Array:
    """Rows h of B_t for the rows' tokens, (H, n, p, w), from the weight products arranged as
    rows too, (H, p, w): w = H p columns (all blocks g) or p (the diagonal block g = h).

    Row h is [C_t^h P_Q^h. + a_tt^h (v_t^h - o_t^h)(q_t^h)^T P_K^h.] / sqrt(p) + a_tt^h P_V^h.,
    with C_t^h = sum_s a_ts^h v_s^h (k_s^h)^T - o_t^h (kbar_t^h)^T.
    """
    head_dim = rows.q.shape[-1]
    k_proj = jnp.einsum("hsi,hiw->hsw", m.k, pq)
    kbar_proj = jnp.einsum("hti,hiw->htw", rows.kbar, pq)
    q_proj = jnp.einsum("hti,hiw->htw", rows.q, pk)
    cross = _weighted_outer_sum(rows.attn, m.v, k_proj)  # (H, n, p, w)
    own = rows.a_self[..., None] * (rows.v_self - rows.o)
    cross += own[..., :, None] * q_proj[..., None, :]
    cross -= rows.o[..., :, None] * kbar_proj[..., None, :]
    return cross / jnp.sqrt(head_dim) + rows.a_self[:, :, None, None] * pv[:, None]


def layer_block_matrix(m: Moments, rows: QueryRows, pq, pk, pv) -> jax.Array:
    """B_t of math.md section 2 for the rows' tokens: (n, H p, H p), det J_t = det(I - B_t).

    Block (h, g) is [C_t^h P_Q^hg + a_tt^h (v_t^h - o_t^h)(q_t^h)^T P_K^hg] / sqrt(p)
    + a_tt^h P_V^hg; pq, pk, pv: the products P_X[h, g], (H, H, p, p) (``weight_products``).
    """
    num_heads, num_rows, head_dim = rows.q.shape
    width = num_heads * head_dim
    as_rows = lambda x: jnp.moveaxis(x, 1, 2).reshape(num_heads, head_dim, width)  # noqa: E731
    blocks = _block_rows(m, rows, as_rows(pq), as_rows(pk), as_rows(pv))  # (H, n, p, H p)
    return jnp.moveaxis(blocks, 0, 1).reshape(num_rows, width, width)


def head_block_matrix(m: Moments, rows: QueryRows, pq, pk, pv) -> jax.Array:
    """The diagonal blocks B_t^hh only: (H, n, p, p). Cheaper than the whole B_t.

    pq, pk, pv: the diagonal products P_X[h, h], (H, p, p) (``head_weight_products``).
    """
    return _block_rows(m, rows, pq, pk, pv)


def _slogdet_identity_minus(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sign and log|det(I - b)| over the last two axes."""
    # Determinants in float32 at least, even when the matmuls run in bfloat16.
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    eye = jnp.eye(b.shape[-1], dtype=b.dtype)
    return logdet.slogdet(eye - b)


class Products(NamedTuple):
    """The weight products a scope needs (None where it needs none)."""

    layer: tuple | None  # P_Q, P_K, P_V, each (H, H, p, p)
    head: tuple | None  # their diagonal blocks, each (H, p, p)


def _products(params: dict, scope: Scope) -> Products:
    layer = weight_products(params) if scope in ("layer", "both") else None
    if scope == "head":
        return Products(None, head_weight_products(params))
    head = tuple(jnp.einsum("hhij->hij", x) for x in layer) if scope == "both" else None
    return Products(layer, head)


def _stats_of_rows(products: Products, m: Moments, rows: QueryRows, scope: Scope) -> dict:
    stats = {}
    if scope in ("layer", "both"):
        blocks = layer_block_matrix(m, rows, *products.layer)
        stats["sign"], stats["logdet"] = _slogdet_identity_minus(blocks)
    if scope in ("head", "both"):
        blocks = head_block_matrix(m, rows, *products.head)
        stats["head_sign"], stats["head_logdet"] = _slogdet_identity_minus(blocks)
    return stats


def jacobian_stats(
    params: dict,
    m: Moments,
    scope: Scope = "both",
    *,
    positions: jax.Array | None = None,
    chunk_size: int = 0,
) -> AttentionStats:
    """Per-token log|det J_t| ("layer"), per-head diagonal-block log-dets ("head"), or both.

    ``positions`` (n,) restricts the work to those tokens (the barrier's unbiased estimator);
    ``chunk_size`` > 0 processes them in chunks under ``jax.checkpoint``, so memory holds one
    chunk's (H, chunk, p, p) blocks, in the forward and the backward pass alike.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown Jacobian scope {scope!r}; expected one of {SCOPES}")
    if scope == "none":
        return AttentionStats()
    products = _products(params, scope)  # shared by every token and chunk: computed once
    if chunk_size <= 0:
        return AttentionStats(**_stats_of_rows(products, m, query_rows(m, positions), scope))
    if positions is None:
        positions = jnp.arange(m.q.shape[1])
    num = positions.shape[0]
    chunk_size = min(chunk_size, num)
    num_chunks = -(-num // chunk_size)
    padded = jnp.concatenate([positions, jnp.full((num_chunks * chunk_size - num,),
                                                  positions[-1], positions.dtype)])

    @jax.checkpoint
    def chunk_stats(chunk_positions):
        return _stats_of_rows(products, m, query_rows(m, chunk_positions), scope)

    stats = jax.lax.map(chunk_stats, padded.reshape(num_chunks, chunk_size))
    def merge(x):  # (chunks, [H,] chunk) -> ([H,] n)
        x = jnp.moveaxis(x, 0, -2)
        return x.reshape(*x.shape[:-2], -1)[..., :num]

    return AttentionStats(**{name: merge(value) for name, value in stats.items()})


def causal_self_attention(
    params: dict,
    u: jax.Array,
    *,
    scope: Scope = "both",
    positions: jax.Array | None = None,
    chunk_size: int = 0,
    with_margins: bool = False,
    with_gains: bool = False,
    singular_scope: Scope | None = None,
    with_spectra: bool = False,
    gram: bool = False,
) -> tuple[jax.Array, AttentionStats]:
    """Multi-head causal self-attention of ``u: (T, d)`` and its Jacobian statistics.

    Args:
      params: {"wq": (d, H, p), "wk": (d, H, p), "wv": (d, H, p), "wo": (H, p, d)}.
      u: the layer's input embeddings, (T, d).
      scope: which log-determinants to compute: "layer" (exact det J_t), "head" (per-head
        diagonal blocks), "both" (default), or "none" to skip the Jacobian work entirely.
      positions: optional (n,) token indices: log-dets for those tokens only.
      chunk_size: > 0 bounds memory by computing the log-dets in chunks of tokens.
      with_margins, with_gains: also the margins sigma_min(J_t) and self-gains ||M_t||_2 of
        the same tokens (an SVD each), from the same attention moments, for
        ``singular_scope`` (default: ``scope``; it may ask for blocks whose log-dets are not
        wanted, ``scope="none"``).
      with_spectra: also ``self_map_spectrum`` of every token (an eigendecomposition each).
      gram: singular values from Gram matrices (faster with gradients; see
        ``extreme_singular_value``).

    Returns:
      out: (T, d), sum_h W_O^h o_t^h with the self-term s = t included.
      stats: AttentionStats over T tokens (n with ``positions``); fields not asked for are None.
    """
    m = attention_moments(params, u)
    stats = jacobian_stats(params, m, scope, positions=positions, chunk_size=chunk_size)
    if with_margins or with_gains:
        stats = stats._replace(**singular_value_stats(
            params, m, scope if singular_scope is None else singular_scope,
            positions=positions, margins=with_margins, gains=with_gains, gram=gram))
    if with_spectra:
        stats = stats._replace(**self_map_spectrum(params, m))
    return attention_output(params, m), stats


def decode_attention(params: dict, u: jax.Array, keys: jax.Array, values: jax.Array,
                     position) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token's attention against a key-value cache: the sampler's incremental step.

    u: (d,), the layer input of the token at ``position``; keys, values: (H, S, p), the cached
    k and v of positions 0..position-1 (later slots are ignored). Returns (out (d,), keys,
    values) with the token's own k and v written at ``position`` (first, so that a donated
    cache is updated in place): the same out_t as ``causal_self_attention`` on the whole
    prefix, at O(S) instead of O(S^2) work.
    """
    q, k, v = (project(params, u[None], name)[:, 0] for name in ("q", "k", "v"))  # (H, p)
    keys = keys.at[:, position].set(k.astype(keys.dtype))
    values = values.at[:, position].set(v.astype(values.dtype))
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("hp,hsp->hs", q, keys.astype(q.dtype)).astype(softmax_dtype)
    scores = jnp.where(jnp.arange(keys.shape[1]) <= position, scores / jnp.sqrt(q.shape[-1]),
                       -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    o = jnp.einsum("hs,hsp->hp", weights, values.astype(q.dtype))
    out = jnp.einsum("hp,hpd->d", o, params["wo"])
    return (out if params.get("bo") is None else out + params["bo"]), keys, values


# ---------------------------------------------------------------------------------------
# Singular values: margins to degeneracy sigma_min(J_t) (Eckart-Young distance to singularity)
# and self-gains ||M_t||_2 of J_t = I - M_t (the invertible-residual condition is ||M_t|| < 1).


def jacobian_factors(params: dict, m: Moments, rows: QueryRows) -> tuple[jax.Array, jax.Array]:
    """U and G with J_t^h = I_d - U^h G_t^h for the rows' tokens.

    U: (H, d, p), U^h = W_O^h.  G: (H, n, p, d), G_t^h = d o_t^h / d u_t (math.md section 2).
    """
    head_dim = rows.q.shape[-1]
    cov = _weighted_outer_sum(rows.attn, m.v, m.k)
    cov -= rows.o[..., :, None] * rows.kbar[..., None, :]  # C_t^h, (H, n, p, p)
    wq_h = jnp.moveaxis(params["wq"], 1, 0)  # (H, d, p): W_Q^h transposed
    wk_h = jnp.moveaxis(params["wk"], 1, 0)
    wv_h = jnp.moveaxis(params["wv"], 1, 0)
    through_query = jnp.einsum("hnij,hdj->hnid", cov, wq_h)
    through_key = jnp.einsum("hn,hni,hnj,hdj->hnid", rows.a_self, rows.v_self - rows.o, rows.q,
                             wk_h)
    through_value = rows.a_self[:, :, None, None] * jnp.swapaxes(wv_h, 1, 2)[:, None]
    g = (through_query + through_key) / jnp.sqrt(head_dim) + through_value
    u_factor = jnp.swapaxes(params["wo"], 1, 2)  # (H, d, p)
    return u_factor, g


def token_jacobian_factors(params: dict, m: Moments) -> tuple[jax.Array, jax.Array]:
    """``jacobian_factors`` of every token: U (H, d, p) and G (H, T, p, d)."""
    return jacobian_factors(params, m, query_rows(m))


def _reduced_self_map(left: jax.Array, right: jax.Array) -> tuple[jax.Array, bool]:
    """M = left @ right.T (d x d, rank <= r) on the smallest space that holds its action.

    When 2r < d, M vanishes on the orthogonal complement of span[left, right] and maps the
    span into itself: its singular values, and those of I - M, are those of a 2r x 2r matrix
    (plus zeros for M and ones for I - M). Returns (that matrix, whether it was reduced).
    The QR's derivative needs [left, right] of full column rank, the generic case (for a
    head, [W_O^h, G_t^h^T] with a_tt > 0); at an exactly rank-deficient pair it is not finite.
    """
    dim, rank = left.shape
    if 2 * rank >= dim:
        return left @ right.T, False
    basis, _ = jnp.linalg.qr(jnp.concatenate([left, right], axis=1))
    return (basis.T @ left) @ (right.T @ basis), True


def _symmetric_extreme(matrix: jax.Array, which: str) -> jax.Array:
    eigenvalues = jnp.linalg.eigvalsh(matrix)
    return eigenvalues[..., 0] if which == "min" else eigenvalues[..., -1]


def _gram_factor(basis: jax.Array) -> jax.Array:
    """A Cholesky factor K of basis^T basis (K K^T = basis^T basis), also where ``basis`` is
    rank-deficient to working precision. [W_O^h, G_t^h^T] can be: the computed Gram matrix is
    then indefinite by up to its rounding error (at most rows x eps x its trace), and the
    plain factorisation is NaN, its gradient too. Where the plain factor fails or has a pivot
    within that rounding error, the Gram matrix gets that bound as a jitter, which keeps it
    positive definite and moves the eigenvalues of K^T C K by O(sqrt(jitter)) in the deficient
    directions only. Elsewhere the factor is the plain one."""
    gram = basis.T @ basis
    size = gram.shape[-1]
    rounding = (basis.shape[0] * jnp.finfo(gram.dtype).eps * jnp.trace(gram)
                + jnp.finfo(gram.dtype).tiny)
    pivots = jnp.diagonal(jnp.linalg.cholesky(jax.lax.stop_gradient(gram)))
    singular = ~jnp.all(jnp.isfinite(pivots) & (pivots**2 > rounding))
    jitter = jax.lax.stop_gradient(jnp.where(singular, rounding, 0.0))
    return jnp.linalg.cholesky(gram + jitter * jnp.eye(size, dtype=gram.dtype))


def _safe_sqrt(squared: jax.Array) -> jax.Array:
    positive = squared > 0  # sqrt's slope is infinite at 0: no gradient from there
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def extreme_singular_value(matrix: jax.Array, which: str, gram: bool = False) -> jax.Array:
    """The smallest ("min") or largest ("max") singular value of ``matrix`` (..., k, k).

    ``gram`` takes it from the eigenvalues of matrix^T matrix (``eigvalsh``) instead of an
    SVD: the same in exact arithmetic and, with its gradient, many times faster on CPU, but it
    squares the condition number, so a singular value below about 1e-3 of the largest loses
    its digits in float32. Training's penalties use it; evaluation reports the SVD's.
    """
    if not gram:
        values = jnp.linalg.svd(matrix, compute_uv=False)
        return values[..., -1] if which == "min" else values[..., 0]
    return _safe_sqrt(_symmetric_extreme(jnp.swapaxes(matrix, -1, -2) @ matrix, which))


def sigma_min_identity_minus_low_rank(left: jax.Array, right: jax.Array,
                                      gram: bool = False) -> jax.Array:
    """Smallest singular value of ``I_d - left @ right.T`` for left, right: (d, r).

    ``gram`` avoids the QR and the SVD, whose gradients dominate a training step: with
    W = [left, right] and J = I - left right^T, J^T J = I + W C W^T for
    C = [[0, -I], [-I, left^T left]], so the eigenvalues of J^T J besides the ones are
    1 + those of K^T C K, K the Cholesky factor of the 2r x 2r Gram matrix W^T W (the same
    full column rank condition as the QR). Squaring costs digits (``extreme_singular_value``).
    """
    dim, rank = left.shape
    if not gram or 2 * rank >= dim:
        self_map, reduced = _reduced_self_map(left, right) if not gram else (
            left @ right.T, False)
        eye = jnp.eye(self_map.shape[0], dtype=self_map.dtype)
        smallest = extreme_singular_value(eye - self_map, "min", gram)
        return jnp.minimum(smallest, 1.0) if reduced else smallest
    basis = jnp.concatenate([left, right], axis=1)
    factor = _gram_factor(basis)
    eye, zeros = jnp.eye(rank, dtype=left.dtype), jnp.zeros((rank, rank), left.dtype)
    coupling = jnp.block([[zeros, -eye], [-eye, left.T @ left]])
    squared = 1.0 + _symmetric_extreme(factor.T @ coupling @ factor, "min")
    return jnp.minimum(_safe_sqrt(squared), 1.0)


def sigma_max_low_rank(left: jax.Array, right: jax.Array, gram: bool = False) -> jax.Array:
    """Largest singular value (spectral norm) of ``left @ right.T`` for left, right: (d, r).

    ``gram``: ||left right^T||^2 is the largest eigenvalue of K^T (right^T right) K, K the
    Cholesky factor of left^T left (r x r): no QR, no SVD.
    """
    if not gram:
        self_map, _ = _reduced_self_map(left, right)
        return extreme_singular_value(self_map, "max")
    factor = _gram_factor(left)
    return _safe_sqrt(_symmetric_extreme(factor.T @ (right.T @ right) @ factor, "max"))


def singular_value_stats(params: dict, m: Moments, scope: Scope, *,
                         positions: jax.Array | None = None, margins: bool = True,
                         gains: bool = False, gram: bool = False) -> dict:
    """Per-token singular values of the Jacobian blocks, for every token or ``positions``.

    "layer" scope: "margin" sigma_min(J_t) and "gain" ||M_t||_2, (n,); "head" scope:
    "head_margin" and "head_gain" of head h acting alone, J_t^h = I_d - W_O^h G_t^h, (H, n);
    "both": all four. One SVD per token and block, of a 2r x 2r matrix when 2r < d
    (``gram``: an eigendecomposition of its Gram matrix instead, ``extreme_singular_value``).

    Their gradients are those of ``jnp.linalg.svd``'s singular values: ds_k = u_k^T dA v_k
    for the singular pair LAPACK returns. Where a singular value is repeated it is not
    differentiable, and this is one element of its generalized gradient (math.md section 9).
    """
    if scope not in ("head", "layer", "both"):
        raise ValueError(f"singular values need scope 'head', 'layer' or 'both', got {scope!r}")
    u_factor, g = jacobian_factors(params, m, query_rows(m, positions))  # (H,d,p), (H,n,p,d)
    wanted = [(name, functools.partial(fn, gram=gram)) for name, fn, on in (
        ("margin", sigma_min_identity_minus_low_rank, margins),
        ("gain", sigma_max_low_rank, gains)) if on]
    stats = {}
    if scope in ("head", "both"):
        right = jnp.swapaxes(g, -1, -2)  # (H, n, d, p)
        for name, fn in wanted:
            per_token = jax.vmap(fn, in_axes=(None, 0))
            stats[f"head_{name}"] = jax.vmap(per_token)(u_factor, right)
    if scope in ("layer", "both"):
        num_heads, dim, head_dim = u_factor.shape
        left = jnp.moveaxis(u_factor, 0, 1).reshape(dim, num_heads * head_dim)
        right = jnp.swapaxes(jnp.moveaxis(g, 0, 1).reshape(-1, num_heads * head_dim, dim), -1, -2)
        for name, fn in wanted:
            stats[name] = jax.vmap(fn, in_axes=(None, 0))(left, right)
    return stats


def self_map_spectrum(params: dict, m: Moments) -> dict:
    """A summary of the eigenvalues of every token's self-map M_t = I_d - J_t, (T,) each:
    "spectral_radius" max |lambda|, "eig_real_max" and "eig_real_min" (the largest and
    smallest real part). det J_t = prod (1 - lambda), so an eigenvalue with real part above 1
    is how a token crosses the degeneracy boundary.

    M_t = U G_t (d x d) and B_t = G_t U (Hp x Hp, ``layer_block_matrix``) share their nonzero
    eigenvalues; the smaller of the two is decomposed, and the zeros the larger one adds are
    counted in.
    """
    num_heads, _, head_dim = m.q.shape
    dim, width = params["wq"].shape[0], num_heads * head_dim
    rows = query_rows(m)
    if width > dim:
        u_factor, g = jacobian_factors(params, m, rows)
        maps = jnp.einsum("hdp,htpe->tde", u_factor, g)  # M_t = sum_h W_O^h G_t^h
    else:
        maps = layer_block_matrix(m, rows, *weight_products(params))
    maps = maps.astype(jnp.promote_types(maps.dtype, jnp.float32))
    eigenvalues = jnp.linalg.eigvals(maps)  # (T, min(d, H p)), complex
    real_max, real_min = jnp.max(eigenvalues.real, axis=-1), jnp.min(eigenvalues.real, axis=-1)
    if width < dim:  # M_t has d - H p more eigenvalues, all 0
        real_max, real_min = jnp.maximum(real_max, 0.0), jnp.minimum(real_min, 0.0)
    return {"spectral_radius": jnp.max(jnp.abs(eigenvalues), axis=-1),
            "eig_real_max": real_max, "eig_real_min": real_min}


def margins(params: dict, u: jax.Array, *, scope: Literal["layer", "head"] = "layer") -> jax.Array:
    """Margin to degeneracy m_t = sigma_min(J_t) per token: (T,) for "layer", (H, T) for "head".

    "head" gives sigma_min(I_d - W_O^h G_t^h), the margin of head h acting alone. This costs a
    singular value decomposition per token; use it for evaluation, not in the training loss.
    """
    return margins_of(params, attention_moments(params, u), scope)


def margins_of(params: dict, m: Moments, scope: Literal["layer", "head"] = "layer",
               positions: jax.Array | None = None) -> jax.Array:
    """``margins`` from attention moments already computed (the forward pass's own), of
    every token or of the token indices ``positions`` (n,) only (bounded memory)."""
    if scope not in ("layer", "head"):
        raise ValueError(f"unknown margin scope {scope!r}; expected 'layer' or 'head'")
    stats = singular_value_stats(params, m, scope, positions=positions)
    return stats["margin" if scope == "layer" else "head_margin"]


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
