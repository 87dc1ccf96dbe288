"""The custom-gradient slogdet against numpy and jnp.linalg.slogdet."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np

from stm_jax import logdet


def test_values_and_gradients_match_the_references(x64):
    a = np.random.default_rng(0).normal(size=(40, 6, 6))
    sign, logabsdet = logdet.slogdet(jnp.asarray(a))
    expected_sign, expected = np.linalg.slogdet(a)
    np.testing.assert_allclose(logabsdet, expected, atol=1e-12)
    np.testing.assert_array_equal(sign, expected_sign)
    grad = jax.grad(lambda a: jnp.sum(logdet.slogdet(a)[1]))(jnp.asarray(a))
    np.testing.assert_allclose(grad, np.swapaxes(np.linalg.inv(a), -1, -2), rtol=1e-8, atol=1e-9)
    jax.test_util.check_grads(lambda a: logdet.slogdet(a)[1], (jnp.asarray(a[:3]),), order=1,
                              modes=["rev"], eps=1e-6)


def test_singular_and_permuted_matrices(x64):
    sign, value = logdet.slogdet(jnp.ones((1, 3, 3)))
    assert sign[0] == 0 and value[0] == -np.inf
    grad = jax.grad(lambda a: jnp.sum(jnp.where(logdet.slogdet(a)[0] == 0, 0.0,
                                                logdet.slogdet(a)[1])))(jnp.ones((1, 3, 3)))
    assert np.all(grad == 0)
    swap = jnp.asarray(np.eye(4)[[1, 0, 3, 2, ]][None] * 2.0)
    np.testing.assert_allclose(logdet.slogdet(swap)[1], np.log(16.0))
    assert logdet.slogdet(swap)[0][0] == 1.0
    odd = jnp.asarray(np.eye(3)[[1, 0, 2]][None])
    assert logdet.slogdet(odd)[0][0] == -1.0
