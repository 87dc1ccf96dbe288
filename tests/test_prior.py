"""The embedding prior (core/prior.py): its blocks J_t = I - Sigma_t A^T against jax.jacfwd."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from stm_jax.core import penalties, prior

# (seed, d, width, project, tokens, scale): with and without the projection, T = 1 and 2
# (blocks that are the identity), and scales that put some determinants below zero.
SHAPES = [(0, 5, 3, True, 7, 1.0), (1, 6, 2, True, 5, 3.0), (2, 4, 4, False, 6, 1.0),
          (3, 3, 3, False, 8, 2.0), (4, 5, 3, True, 1, 1.0), (5, 4, 2, True, 2, 2.0),
          (1, 5, 3, True, 8, 2.0), (6, 5, 3, True, 8, 3.0), (7, 5, 3, True, 8, 1.0)]


def random_prior(seed, d, width, project, tokens, scale):
    params = prior.init_prior_params(jax.random.PRNGKey(seed), d, width, project=project,
                                     dtype=jnp.float64)
    params = jax.tree.map(lambda w: scale * w, params)
    x0 = jax.random.normal(jax.random.PRNGKey(seed + 100), (tokens, d), jnp.float64)
    return params, x0


def autodiff_blocks(params, x0):
    """d e_t / d u_t by jax.jacfwd of the residual map of the latents u (the oracle)."""
    unprojected = {name: value for name, value in params.items() if name != "proj"}
    u = prior.latents(params, x0)
    jac = jax.jacfwd(lambda latents: prior.prior_residual(unprojected, latents))(u)
    return np.stack([np.asarray(jac[t, :, t, :]) for t in range(u.shape[0])])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_blocks_match_autodiff(x64, shape):
    params, x0 = random_prior(*shape)
    blocks = autodiff_blocks(params, x0)
    stats = jax.jit(lambda p, x: prior.prior_stats(p, x, margins=True, gains=True))(params, x0)
    sign, logabsdet = np.linalg.slogdet(blocks)
    np.testing.assert_allclose(stats["logdet"], logabsdet, atol=1e-10, rtol=0)
    np.testing.assert_array_equal(stats["sign"], sign)
    np.testing.assert_allclose(stats["margin"], np.linalg.svd(blocks, compute_uv=False)[:, -1],
                               atol=1e-10, rtol=0)
    gains = np.linalg.svd(np.eye(blocks.shape[-1]) - blocks, compute_uv=False)[:, 0]
    np.testing.assert_allclose(stats["gain"], gains, atol=1e-10, rtol=0)
    # From Gram matrices, as training takes them: the same to the squared condition number.
    gram = prior.prior_stats(params, x0, margins=True, gains=True, gram=True)
    np.testing.assert_allclose(gram["margin"], stats["margin"], atol=1e-7, rtol=0)
    np.testing.assert_allclose(gram["gain"], stats["gain"], atol=1e-7, rtol=0)
    # The first position has no past (mu_1 = 0): J_1 = I, and e_1 = u_1.
    np.testing.assert_allclose(blocks[0], np.eye(blocks.shape[-1]), atol=1e-12)
    u = prior.latents(params, x0)
    np.testing.assert_allclose(stats["residual_sq"][0], np.sum(np.asarray(u[0]) ** 2))


def test_the_shapes_include_negative_determinants(x64):
    signs = np.concatenate([np.asarray(prior.prior_stats(*random_prior(*shape))["sign"])
                            for shape in SHAPES])
    assert np.sum(signs < 0) >= 4


def test_positions_gather_the_same_blocks(x64):
    params, x0 = random_prior(*SHAPES[0])
    every = prior.prior_stats(params, x0, margins=True)
    some = prior.prior_stats(params, x0, positions=jnp.array([1, 4, 6]), margins=True)
    for name in ("logdet", "sign", "margin"):
        np.testing.assert_allclose(some[name], every[name][np.array([1, 4, 6])], atol=1e-12)


def test_strict_causality_by_gradients(x64):
    """e_t depends on x0_s for s <= t only (mu_t on s < t)."""
    params, x0 = random_prior(*SHAPES[0])
    jac = jax.jacrev(lambda x: prior.prior_residual(params, x))(x0)  # (T, p, T, d)
    for t in range(x0.shape[0]):
        assert np.all(np.asarray(jac[t, :, t + 1:]) == 0)


@pytest.mark.parametrize("name", penalties.PENALTIES)
def test_penalty_gradients_match_finite_differences(x64, name):
    """Every penalty of the prior's blocks, differentiated through its parameters and the
    embeddings (which receive the prior's gradient), under jit and vmap."""
    params, x0 = random_prior(*SHAPES[0])
    batch = jnp.stack([x0, x0[::-1]])
    reads = penalties.SINGULAR_VALUE_PENALTIES.get(name, "logdet")

    def mean_penalty(params, batch):
        stats = jax.vmap(lambda x: prior.prior_stats(
            params, x, positions=jnp.arange(1, x.shape[0]), logdets=reads == "logdet",
            margins=reads == "margin", gains=reads == "gain", gram=True))(batch)
        return jnp.mean(penalties.penalty(name, stats, tau=1.2, knee=0.5))

    jax.test_util.check_grads(jax.jit(mean_penalty), (params, batch), order=1, modes=["rev"],
                              eps=1e-6, atol=1e-5, rtol=1e-5)
