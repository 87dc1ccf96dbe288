"""The smooth log-barrier's four requirements, margins-based support tokens, infeasible counts."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from stm_jax.core import barrier

EPS = 0.05


def from_det(x):
    """The slogdet-form barrier evaluated at a plain determinant."""
    x = jnp.asarray(x, jnp.float64)
    return barrier.smooth_log_barrier(jnp.sign(x), jnp.log(jnp.abs(x)), EPS)


def test_equals_minus_log_det_above_eps(x64):
    x = np.geomspace(EPS, 1e30, 200)
    np.testing.assert_allclose(from_det(x), -np.log(x), rtol=1e-12)
    np.testing.assert_allclose(barrier.barrier_of_det(x, EPS), -np.log(x), rtol=1e-12)


def test_decreasing_everywhere_and_both_forms_agree(x64):
    x = np.concatenate([-np.geomspace(1e12, 1e-8, 400), [0.0], np.geomspace(1e-8, 1e12, 400)])
    values = np.asarray(barrier.barrier_of_det(x, EPS))
    assert np.all(np.diff(values) < 0)
    np.testing.assert_allclose(from_det(x), values, rtol=1e-12)
    slopes = jax.vmap(jax.grad(lambda x: barrier.barrier_of_det(x, EPS)))(jnp.asarray(x))
    assert np.all(np.asarray(slopes) < 0)


def test_continuous_with_continuous_slope_at_the_joins(x64):
    f = lambda x: barrier.barrier_of_det(x, EPS)  # noqa: E731
    for join in (EPS, -1.0):
        below, above = join - 1e-9, join + 1e-9
        assert abs(f(below) - f(above)) < 1e-6
        assert abs(jax.grad(f)(below) - jax.grad(f)(above)) < 1e-4 * abs(jax.grad(f)(above))


def test_finite_value_and_gradient_at_zero_determinant(x64):
    # The quadratic piece's slope at 0 is -1/eps - 1/eps (analytic oracle).
    assert np.isclose(jax.grad(lambda x: barrier.barrier_of_det(x, EPS))(0.0), -2 / EPS)
    value, (grad_sign, grad_logdet) = jax.value_and_grad(
        lambda s, logdet: barrier.smooth_log_barrier(s, logdet, EPS), argnums=(0, 1))(0.0, -jnp.inf)
    assert np.isfinite(value) and np.isclose(value, -np.log(EPS) + 1 + 0.5)
    assert np.isfinite(grad_sign) and np.isfinite(grad_logdet)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_finite_for_huge_negative_determinants(x64, dtype):
    logdets = jnp.asarray([1.0, 50.0, 1e3, 1e6], dtype)  # |det| up to e^(1e6): overflows as x
    values, grads = jax.vmap(jax.value_and_grad(
        lambda logdet: barrier.smooth_log_barrier(-1.0, logdet, EPS)))(logdets)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    assert np.all(np.diff(values) > 0)  # more negative det -> larger barrier
    assert np.all(grads > 0) and np.all(grads == grads[0])  # bounded, linear in log|det|


def test_gradient_matches_finite_differences(x64):
    for x in (-3.0, -0.5, 0.0, 0.01, 0.3, 2.0):
        jax.test_util.check_grads(lambda x: barrier.barrier_of_det(x, EPS), (x,), order=2,
                                  modes=["rev"], eps=1e-6)
    for sign, logdet in ((1.0, -5.0), (1.0, 0.7), (-1.0, -0.5), (-1.0, 4.0)):
        jax.test_util.check_grads(lambda x, s=sign: barrier.smooth_log_barrier(s, x, EPS),
                                  (logdet,), order=1, modes=["rev"], eps=1e-6)


def test_eps_must_be_positive():
    with pytest.raises(ValueError, match="eps must be positive"):
        barrier.smooth_log_barrier(1.0, 0.0, 0.0)


def test_infeasible_counts_non_positive_determinants():
    sign = jnp.asarray([[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]])
    assert int(barrier.infeasible_count(sign)) == 3
    np.testing.assert_array_equal(barrier.infeasible(sign), sign <= 0)


def test_support_tokens_threshold_and_bottom_k():
    rng = np.random.default_rng(0)
    margin = rng.uniform(size=(2, 3, 11))  # (layer, head, token)
    mask = barrier.support_tokens_threshold(margin, 0.2)
    np.testing.assert_array_equal(mask, margin <= 0.2)
    indices, mask = barrier.support_tokens_bottom_k(jnp.asarray(margin), 4)
    expected = np.sort(np.argsort(margin, axis=-1)[..., :4], axis=-1)
    np.testing.assert_array_equal(np.sort(indices, axis=-1), expected)
    assert np.all(np.sum(mask, axis=-1) == 4)
    assert np.all(np.max(np.where(mask, margin, -1), -1) <= np.min(np.where(mask, 2, margin), -1))
    with pytest.raises(ValueError, match="bottom-k"):
        barrier.support_tokens_bottom_k(jnp.asarray(margin), 12)


def test_margin_quantiles_match_numpy():
    margin = np.random.default_rng(1).uniform(size=100)
    quantiles = barrier.margin_quantiles(jnp.asarray(margin))
    assert np.isclose(quantiles["q05"], np.quantile(margin, 0.05), rtol=1e-5)
    assert np.isclose(quantiles["q00"], margin.min())


def test_exact_slope_at_the_joins_and_for_eps_above_one(x64):
    for eps in (EPS, 2.0):
        for x in (-1.0, 1.2, 1.9):
            expected = jax.grad(lambda y, e=eps: barrier._quadratic(y, e))(x)
            if x >= eps:
                expected = -1 / x
            got = jax.grad(lambda y, e=eps: barrier.barrier_of_det(y, e))(x)
            np.testing.assert_allclose(got, expected, rtol=1e-12)
            sign = float(np.sign(x))
            got = jax.grad(lambda lg, s=sign, e=eps: barrier.smooth_log_barrier(s, lg, e))(
                np.log(abs(x)))
            np.testing.assert_allclose(got, expected * x, rtol=1e-12)  # d/dlog|x| = x d/dx
