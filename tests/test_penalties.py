"""Every penalty on the model's attention blocks: values against a dense reference (the d x d
blocks by jax.jacfwd, their determinants and SVDs by NumPy), gradients against finite
differences, and the behaviour of sigma_min's gradient at repeated singular values."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import random_layer

from stm_jax.core import attention, barrier, penalties

# d = 8 with H = 2 heads of p = 2: a head's update has rank 2 (the 2r x 2r reduction, 4 < 8);
# the layer's has rank 4 (the full d x d SVD, since 2 r = 8 >= d).
D, HEADS, HEAD_DIM, TOKENS = 8, 2, 2, 6
SETTINGS = dict(eps=0.05, cap=3.0, tau=1.1, knee=0.4)


def dense_blocks(params, u, head=None):
    full = jax.jacfwd(lambda x: attention.residual(params, x, head))(u)  # (T, d, T, d)
    return np.asarray(jnp.einsum("tdte->tde", full))


def dense_penalty(name, blocks):
    """The penalty from the dense d x d blocks J_t, by NumPy."""
    sign, logabsdet = np.linalg.slogdet(blocks)
    if name == "log_barrier":
        return np.asarray(barrier.barrier_of_det(sign * np.exp(logabsdet), SETTINGS["eps"]))
    if name == "abs_log_capped":
        return np.minimum(-logabsdet, SETTINGS["cap"])
    if name == "logdet_squared":
        return logabsdet**2
    if name == "margin_hinge":
        margin = np.linalg.svd(blocks, compute_uv=False)[:, -1]
        return np.maximum(SETTINGS["tau"] - margin, 0) ** 2
    gain = np.linalg.svd(np.eye(blocks.shape[-1]) - blocks, compute_uv=False)[:, 0]
    knee = SETTINGS["knee"]
    taylor = -np.log1p(-knee) + (gain - knee) / (1 - knee) + (gain - knee) ** 2 / (
        2 * (1 - knee) ** 2)
    return np.where(gain < knee, -np.log1p(-np.minimum(gain, knee)), taylor)


def closed_form_penalty(name, params, u, scope, gram=False):
    """The penalty from the closed-form statistics: (T,) for "layer", (H, T) for "head";
    ``gram``: singular values from Gram matrices, as training takes them."""
    reads = penalties.SINGULAR_VALUE_PENALTIES.get(name, "logdet")
    _, stats = attention.causal_self_attention(
        params, u, scope=scope if reads == "logdet" else "none", singular_scope=scope,
        with_margins=reads == "margin", with_gains=reads == "gain", gram=gram)
    stats = {key: value for key, value in stats._asdict().items() if value is not None}
    return penalties.penalty(name, stats, prefix="head_" if scope == "head" else "",
                             **SETTINGS)


@pytest.mark.parametrize("gram", [False, True], ids=["svd", "gram"])
@pytest.mark.parametrize("name", penalties.PENALTIES)
def test_values_match_the_dense_reference(x64, name, gram):
    if gram and name in penalties.DETERMINANT_PENALTIES:
        pytest.skip("no singular values")
    params, u = random_layer(7, D, HEADS, HEAD_DIM, TOKENS, scale=2.5, dtype=jnp.float64)
    # The Gram route jitters a Gram matrix singular to working precision (one token here),
    # which moves its singular values by O(sqrt(10 eps)), about 5e-8 in float64.
    atol = 3 * np.sqrt(10 * np.finfo(np.float64).eps) if gram else 1e-9
    layer = jax.jit(lambda p, x: closed_form_penalty(name, p, x, "layer", gram))(params, u)
    np.testing.assert_allclose(layer, dense_penalty(name, dense_blocks(params, u)), atol=atol)
    heads = jax.jit(lambda p, x: closed_form_penalty(name, p, x, "head", gram))(params, u)
    for h in range(HEADS):
        np.testing.assert_allclose(heads[h], dense_penalty(name, dense_blocks(params, u, h)),
                                   atol=atol)


@pytest.mark.parametrize("scope", ["head", "layer"])
@pytest.mark.parametrize("name", penalties.PENALTIES)
def test_gradients_match_finite_differences(x64, name, scope):
    """As training differentiates them: singular values from Gram matrices."""
    params, u = random_layer(8, D, HEADS, HEAD_DIM, TOKENS, scale=1.5, dtype=jnp.float64)
    batch = jnp.stack([u, 0.5 * u])

    def mean_penalty(params, batch):
        return jnp.mean(jax.vmap(lambda x: closed_form_penalty(name, params, x, scope,
                                                               gram=True))(batch))

    jax.test_util.check_grads(jax.jit(mean_penalty), (params, batch), order=1, modes=["rev"],
                              eps=1e-6, atol=1e-5, rtol=1e-5)


def test_float32_values_are_finite():
    params, u = random_layer(9, D, HEADS, HEAD_DIM, TOKENS, scale=3.0, dtype=jnp.float32)
    for name in penalties.PENALTIES:
        for scope in ("head", "layer"):
            values = closed_form_penalty(name, params, u, scope)
            assert values.dtype == jnp.float32 and np.all(np.isfinite(values)), (name, scope)


def test_small_gain_is_c2_at_the_knee_and_finite_past_one(x64):
    knee = 0.9
    phi = lambda r: penalties.small_gain(r, knee)  # noqa: E731
    slope, curvature = jax.grad(phi), jax.grad(jax.grad(phi))
    below, above = knee - 1e-7, knee + 1e-7
    np.testing.assert_allclose(phi(knee), -np.log(1 - knee), rtol=1e-12)  # the two pieces meet
    np.testing.assert_allclose(phi(below), phi(above), atol=3 * 2e-7 * float(slope(knee)))
    np.testing.assert_allclose(slope(below), slope(above), rtol=1e-5)
    np.testing.assert_allclose(curvature(below), curvature(above), rtol=1e-4)
    np.testing.assert_allclose(phi(0.3), -np.log(0.7), rtol=1e-12)
    assert phi(0.0) == 0 and np.isfinite(phi(1.0)) and np.isfinite(slope(5.0))
    assert np.all(np.diff(phi(jnp.linspace(0, 3, 50))) > 0)
    with pytest.raises(ValueError, match="knee"):
        penalties.small_gain(0.5, 1.0)


def test_the_hinge_and_the_cap_act_only_at_their_constraint(x64):
    margins = jnp.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(penalties.margin_hinge(margins, 0.5), [0.09, 0.0, 0.0])
    logdets = jnp.array([-40.0, -1.0, 2.0])
    np.testing.assert_allclose(penalties.abs_log_capped(logdets, 30.0), [30.0, 1.0, -2.0])
    capped = jax.grad(lambda x: jnp.sum(penalties.abs_log_capped(x, 30.0)))(logdets)
    np.testing.assert_allclose(capped, [0.0, -1.0, -1.0])  # no gradient past the cap
    active = penalties.active("margin_hinge", {"margin": margins}, tau=0.5)
    np.testing.assert_array_equal(active, [True, False, False])


def test_sigma_min_gradient_at_repeated_singular_values(x64):
    """sigma_min is not differentiable where it is repeated (at J = I every singular value is
    1). jnp.linalg.svd's rule gives u_k^T dJ v_k for the singular pair LAPACK returns: here a
    gradient x x^T with |x| = 1, one element of sigma_min's generalized (Clarke) gradient at I,
    the convex hull of such x x^T. Through the low-rank reduction (QR of [left, right]) the
    gradient is finite wherever [left, right] has full column rank, as a head's
    [W_O^h, G_t^h^T] has (a_tt > 0); close to J = I too."""
    gradient = jax.grad(lambda jac: jnp.linalg.svd(jac, compute_uv=False)[-1])(jnp.eye(5))
    gradient = np.asarray(gradient)
    np.testing.assert_allclose(gradient, gradient.T, atol=1e-12)
    eigenvalues = np.linalg.eigvalsh(gradient)
    np.testing.assert_allclose(eigenvalues, [0, 0, 0, 0, 1], atol=1e-12)  # x x^T, |x| = 1
    rng = np.random.default_rng(0)
    left, right = (jnp.asarray(rng.standard_normal((6, 2))) for _ in range(2))
    grads = jax.grad(attention.sigma_min_identity_minus_low_rank, argnums=(0, 1))(
        left, 1e-6 * right)  # J = I - 1e-6 left right^T
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# The jitter moves a deficient block's singular values by O(sqrt(rows eps trace)): a few
# thousandths in float32, below 1e-7 in float64.
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-2), ("float64", 1e-6)])
def test_gram_singular_values_where_the_update_has_no_rank_to_spare(x64, dtype, atol):
    """Training's Gram route factors [left, right]^T [left, right] (Cholesky). Where attention
    is one-hot, G_t loses rank and that Gram matrix is singular: the plain factorisation was
    NaN, the margin read as 0 and the hinge's gradient NaN. Against the SVD of the dense d x d
    matrix: values, finite gradients, and in float64 the SVD route's gradients where sigma_min
    is simple."""
    rng = np.random.default_rng(3)
    left = jnp.asarray(0.3 * rng.standard_normal((16, 4)), dtype)
    right = 0.3 * rng.standard_normal((16, 4))
    deficient = {"two zero columns": right * [0, 1, 0, 1],
                 "rank one": np.outer(right[:, 0], [1.0, -0.5, 0.25, 2.0]),
                 "zero": np.zeros_like(right)}
    for case, value in deficient.items():
        value = jnp.asarray(value, dtype)
        dense = jnp.eye(16, dtype=dtype) - left @ value.T
        expected = np.linalg.svd(np.asarray(dense, np.float64), compute_uv=False)
        margin = attention.sigma_min_identity_minus_low_rank(left, value, gram=True)
        gain = attention.sigma_max_low_rank(value, left, gram=True)  # Cholesky of value^T value
        np.testing.assert_allclose(margin, expected[-1], atol=atol, err_msg=case)
        np.testing.assert_allclose(
            gain, np.linalg.svd(np.asarray(value @ left.T, np.float64), compute_uv=False)[0],
            atol=atol, err_msg=case)
        gain_grads = jax.grad(lambda a, b: attention.sigma_max_low_rank(b, a, gram=True),
                              argnums=(0, 1))(left, value)
        grads = jax.grad(lambda a, b: attention.sigma_min_identity_minus_low_rank(
            a, b, gram=True), argnums=(0, 1))(left, value)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in (*grads, *gain_grads)), case
        if case != "zero" and dtype == "float64":  # at zero, sigma_min = 1 is repeated
            reference = jax.grad(lambda a, b: jnp.linalg.svd(
                jnp.eye(16, dtype=dtype) - a @ b.T, compute_uv=False)[-1], argnums=(0, 1))(
                left, value)
            for got, want in zip(grads, reference, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=case)


def test_gram_singular_values_of_nearly_dependent_updates_in_float32():
    """[left, right] independent only within float32 rounding: the computed Gram matrix is
    indefinite by its rounding error, which broke training's hinge. Batched, as training
    evaluates them: every margin near the SVD's, every gradient finite."""
    rng = np.random.default_rng(5)
    left = jnp.asarray(0.3 * rng.standard_normal((16, 4)), jnp.float32)
    mix = rng.standard_normal((64, 4, 4))
    noise = 1e-6 * rng.standard_normal((64, 16, 4))
    rights = jnp.asarray(np.einsum("dr,brs->bds", np.asarray(left), mix) + noise, jnp.float32)
    margin = jax.vmap(lambda r: attention.sigma_min_identity_minus_low_rank(left, r, gram=True))
    expected = np.linalg.svd(np.eye(16) - np.einsum(
        "dr,ber->bde", np.asarray(left, np.float64), np.asarray(rights, np.float64)),
        compute_uv=False)[:, -1]
    np.testing.assert_allclose(margin(rights), expected, atol=2e-2)
    grads = jax.grad(lambda a, b: jnp.sum(jax.vmap(
        lambda r: attention.sigma_min_identity_minus_low_rank(a, r, gram=True))(b)),
        argnums=(0, 1))(left, rights)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
