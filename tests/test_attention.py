"""The closed-form Jacobian blocks against autodiff (jax.jacfwd) in float64."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import random_layer

from stm_jax.core import attention


def residual_map(params, head=None):
    """e = u - out (all heads, or one head alone): the map whose diagonal blocks are J_t."""
    return lambda u: attention.residual(params, u, head)


@functools.partial(jax.jit, static_argnames="head")
def autodiff_diagonal_blocks(params, u, head=None):
    full = jax.jacfwd(residual_map(params, head))(u)  # (T, d, T, d)
    return jnp.einsum("tdte->tde", full)


@jax.jit
def closed_form(params, u):
    _, stats = attention.causal_self_attention(params, u, scope="both", with_gains=True,
                                               with_spectra=True)
    return stats, attention.margins(params, u), attention.margins(params, u, scope="head")


def random_shapes(count):
    rng = np.random.default_rng(0)
    for seed in range(count):
        heads, head_dim, tokens = rng.integers(1, 5), rng.integers(1, 9), rng.integers(1, 10)
        # d below, equal to and above H p, and above 2p, so every reduction path is used.
        d = int(rng.choice([max(1, heads * head_dim - 1), heads * head_dim, 2 * head_dim + 3]))
        yield seed, d, int(heads), int(head_dim), int(tokens)


SHAPES = list(random_shapes(16))


@pytest.mark.parametrize("seed,d,heads,head_dim,tokens", SHAPES)
def test_closed_form_matches_autodiff_blocks(x64, seed, d, heads, head_dim, tokens):
    """log|det|, sign, sigma_min, the self-gain ||I - J_t||_2 and the self-map's eigenvalues
    per token, whole layer and per head, to 1e-9."""
    params, u = random_layer(seed, d, heads, head_dim, tokens, scale=3.0, dtype=jnp.float64)
    stats, layer_margins, head_margins = closed_form(params, u)
    blocks = np.asarray(autodiff_diagonal_blocks(params, u))
    sign, logabsdet = np.linalg.slogdet(blocks)
    np.testing.assert_allclose(stats.logdet, logabsdet, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(stats.sign, sign)
    expected_margins = np.linalg.svd(blocks, compute_uv=False)[:, -1]
    np.testing.assert_allclose(layer_margins, expected_margins, atol=1e-9, rtol=0)
    self_maps = np.eye(d) - blocks
    np.testing.assert_allclose(stats.gain, np.linalg.svd(self_maps, compute_uv=False)[:, 0],
                               atol=1e-9, rtol=0)
    eigenvalues = np.linalg.eigvals(self_maps)
    np.testing.assert_allclose(stats.spectral_radius, np.abs(eigenvalues).max(axis=-1),
                               atol=1e-8, rtol=0)
    np.testing.assert_allclose(stats.eig_real_max, eigenvalues.real.max(axis=-1), atol=1e-8)
    np.testing.assert_allclose(stats.eig_real_min, eigenvalues.real.min(axis=-1), atol=1e-8)
    for h in range(heads):
        head_blocks = np.asarray(autodiff_diagonal_blocks(params, u, head=h))
        sign, logabsdet = np.linalg.slogdet(head_blocks)
        np.testing.assert_allclose(stats.head_logdet[h], logabsdet, atol=1e-9, rtol=0)
        np.testing.assert_array_equal(stats.head_sign[h], sign)
        expected_margins = np.linalg.svd(head_blocks, compute_uv=False)[:, -1]
        np.testing.assert_allclose(head_margins[h], expected_margins, atol=1e-9, rtol=0)
        expected_gains = np.linalg.svd(np.eye(d) - head_blocks, compute_uv=False)[:, 0]
        np.testing.assert_allclose(stats.head_gain[h], expected_gains, atol=1e-9, rtol=0)


def with_biases(params, seed: int, scale: float = 1.0) -> dict:
    """GPT-2-style biases on q, k, v and the output, drawn by NumPy."""
    rng = np.random.default_rng(seed + 1000)
    heads, head_dim, d = params["wo"].shape
    biases = {name: scale * rng.standard_normal((heads, head_dim)) for name in ("bq", "bk", "bv")}
    biases["bo"] = scale * rng.standard_normal(d)
    return {**params, **jax.tree.map(lambda b: jnp.asarray(b, params["wq"].dtype), biases)}


@pytest.mark.parametrize("seed,d,heads,head_dim,tokens", SHAPES[:8])
def test_biased_layer_matches_autodiff_blocks(x64, seed, d, heads, head_dim, tokens):
    """With q, k, v and output biases the same closed forms are exact (math.md section 2)."""
    params, u = random_layer(seed, d, heads, head_dim, tokens, scale=3.0, dtype=jnp.float64)
    params = with_biases(params, seed)
    stats, layer_margins, head_margins = closed_form(params, u)
    blocks = np.asarray(autodiff_diagonal_blocks(params, u))
    sign, logabsdet = np.linalg.slogdet(blocks)
    np.testing.assert_allclose(stats.logdet, logabsdet, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(stats.sign, sign)
    np.testing.assert_allclose(layer_margins, np.linalg.svd(blocks, compute_uv=False)[:, -1],
                               atol=1e-9, rtol=0)
    for h in range(heads):
        head_blocks = np.asarray(autodiff_diagonal_blocks(params, u, head=h))
        sign, logabsdet = np.linalg.slogdet(head_blocks)
        np.testing.assert_allclose(stats.head_logdet[h], logabsdet, atol=1e-9, rtol=0)
        np.testing.assert_array_equal(stats.head_sign[h], sign)
        np.testing.assert_allclose(head_margins[h],
                                   np.linalg.svd(head_blocks, compute_uv=False)[:, -1],
                                   atol=1e-9, rtol=0)
    # The biases matter: the query bias changes the statistics, the output bias the output.
    _, unbiased = jax.jit(attention.causal_self_attention)(
        {k: params[k] for k in ("wq", "wk", "wv", "wo")}, u)
    if tokens > 1:
        assert not np.allclose(stats.logdet, unbiased.logdet)


def test_the_random_shapes_include_negative_determinants(x64):
    # The log-determinants alone: compiling the margins' SVDs for every shape took 30 s.
    layer_stats = jax.jit(lambda p, u: attention.causal_self_attention(p, u, scope="layer")[1])
    negatives = 0
    for seed, d, heads, head_dim, tokens in SHAPES:
        params, u = random_layer(seed, d, heads, head_dim, tokens, scale=3.0, dtype=jnp.float64)
        negatives += int(jnp.sum(layer_stats(params, u).sign < 0))
    assert negatives > 5


@pytest.mark.parametrize("biased", [False, True])
def test_output_is_multi_head_causal_attention(x64, biased):
    params, u = random_layer(3, 8, 2, 4, 6, scale=1.0, dtype=jnp.float64)
    params = with_biases(params, 3) if biased else params
    out, _ = attention.causal_self_attention(params, u, scope="none")
    expected = np.tile(np.asarray(params.get("bo", np.zeros(8))), (6, 1))
    for h in range(2):
        q, k, v = (u @ params["w" + n][:, h, :] + (params["b" + n][h] if biased else 0)
                   for n in ("q", "k", "v"))
        for t in range(6):
            scores = q[t] @ k[: t + 1].T / np.sqrt(4)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            expected[t] += (weights @ v[: t + 1]) @ params["wo"][h]
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_scope_none_skips_the_jacobian():
    params, u = random_layer(0, 8, 2, 4, 5, scale=1.0, dtype=jnp.float32)
    _, stats = attention.causal_self_attention(params, u, scope="none")
    assert all(field is None for field in stats)
    with pytest.raises(ValueError, match="unknown Jacobian scope"):
        attention.causal_self_attention(params, u, scope="diagonal")


def test_causality_by_gradients(x64):
    params, u = random_layer(1, 6, 2, 3, 7, scale=2.0, dtype=jnp.float64)
    tokens = u.shape[0]

    def per_token(u):
        out, stats = attention.causal_self_attention(params, u)
        return jnp.sum(out, axis=-1), stats.logdet, attention.margins(params, u)

    for jac in jax.jit(jax.jacrev(per_token))(u):  # each (T, T, d)
        for t in range(tokens):
            assert np.all(jac[t, t + 1:] == 0), f"token {t} depends on a later token"
            if t > 0:  # token 0 is a linear map of u_0 alone: its log-det is constant
                assert np.any(jac[t, : t + 1] != 0)


def test_projectivity_prefix_statistics_do_not_change_when_extended(x64):
    params, u = random_layer(2, 6, 2, 3, 9, scale=2.5, dtype=jnp.float64)
    forward = jax.jit(lambda u: attention.causal_self_attention(params, u))
    out_full, stats_full = forward(u)
    _, layer_margins_full, head_margins_full = closed_form(params, u)
    for n in (1, 4, 8):
        out, stats = forward(u[:n])
        _, layer_margins, head_margins = closed_form(params, u[:n])
        np.testing.assert_allclose(out, out_full[:n], atol=1e-12)
        np.testing.assert_allclose(stats.logdet, stats_full.logdet[:n], atol=1e-12)
        np.testing.assert_allclose(stats.head_logdet, stats_full.head_logdet[:, :n], atol=1e-12)
        np.testing.assert_allclose(layer_margins, layer_margins_full[:n], atol=1e-12)
        np.testing.assert_allclose(head_margins, head_margins_full[:, :n], atol=1e-12)


def test_jit_vmap_grad_and_float32():
    params, _ = random_layer(4, 8, 2, 4, 6, scale=1.5, dtype=jnp.float32)
    batch = jax.random.normal(jax.random.PRNGKey(5), (3, 6, 8))
    eager = [attention.causal_self_attention(params, seq) for seq in batch]
    batched = jax.jit(jax.vmap(lambda seq: attention.causal_self_attention(params, seq)))(batch)
    for i, (out, stats) in enumerate(eager):
        np.testing.assert_allclose(batched[0][i], out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched[1].logdet[i], stats.logdet, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[1].head_logdet[i], stats.head_logdet, rtol=1e-5,
                                   atol=1e-5)
        assert stats.logdet.dtype == jnp.float32

    def total_logdet(params):
        return jnp.sum(jax.vmap(lambda s: attention.causal_self_attention(params, s)[1].logdet)(
            batch))

    grads = jax.jit(jax.grad(total_logdet))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_logdet_gradient_matches_finite_differences(x64):
    params, u = random_layer(6, 6, 2, 3, 5, scale=1.5, dtype=jnp.float64)
    # Jitted: check_grads runs many forward, JVP and VJP evaluations (34 s eager, on 2 cores).
    f = jax.jit(lambda p: jnp.sum(attention.causal_self_attention(p, u)[1].logdet))
    jax.test_util.check_grads(f, (params,), order=1, modes=["rev", "fwd"], eps=1e-6,
                              atol=1e-6, rtol=1e-6)


def test_bfloat16_matmuls_keep_float32_determinants():
    params, u = random_layer(7, 8, 2, 4, 6, scale=1.0, dtype=jnp.float32)
    low = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    _, stats = attention.causal_self_attention(low, u.astype(jnp.bfloat16))
    _, reference = attention.causal_self_attention(params, u)
    assert stats.logdet.dtype == jnp.float32
    np.testing.assert_allclose(stats.logdet, reference.logdet, atol=0.05)


def test_margins_of_chosen_positions(x64):
    """analyze.py computes margins in chunks of positions: the same as those of every token."""
    params, u = random_layer(8, 12, 3, 4, 10, scale=2.0, dtype=jnp.float64)
    m = attention.attention_moments(params, u)
    index = np.array([0, 2, 5, 6, 9])
    some = jax.jit(attention.margins_of, static_argnums=2)
    for scope in ("layer", "head"):
        np.testing.assert_allclose(some(params, m, scope, jnp.asarray(index)),
                                   closed_form(params, u)[1 if scope == "layer" else 2][..., index],
                                   atol=1e-12)


@pytest.mark.parametrize("positions,chunk_size", [
    (None, 3), (np.array([1, 4, 7, 9]), 0), (np.array([0, 2, 5, 6, 9]), 2)])
def test_positions_and_chunks_give_the_same_statistics(x64, positions, chunk_size):
    params, u = random_layer(8, 12, 3, 4, 10, scale=2.0, dtype=jnp.float64)
    _, full = jax.jit(attention.causal_self_attention)(params, u)
    index = np.arange(10) if positions is None else positions
    f = lambda p: attention.causal_self_attention(  # noqa: E731
        p, u, positions=None if positions is None else jnp.asarray(positions),
        chunk_size=chunk_size)[1]
    stats = jax.jit(f)(params)
    np.testing.assert_allclose(stats.logdet, full.logdet[index], atol=1e-12)
    np.testing.assert_allclose(stats.head_logdet, full.head_logdet[:, index], atol=1e-12)
    np.testing.assert_array_equal(stats.head_sign, full.head_sign[:, index])
    # Gradients through the chunked, rematerialised path equal the plain ones.
    total = lambda s: jnp.sum(s.logdet) + jnp.sum(s.head_logdet)  # noqa: E731
    plain = jax.jit(jax.grad(lambda p: total(jax.tree.map(
        lambda x: x[..., index], attention.causal_self_attention(p, u)[1]))))(params)
    chunked = jax.jit(jax.grad(lambda p: total(f(p))))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10)
