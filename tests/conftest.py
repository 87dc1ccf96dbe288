"""Shared fixtures: small random attention layers in float64 for oracle comparisons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Run a test body in float64 (the autodiff oracles are compared to 1e-9)."""
    with jax.enable_x64(True):
        yield


def random_layer(seed: int, d: int, heads: int, head_dim: int, tokens: int, scale: float, dtype):
    """A random attention layer and input; a large scale puts some determinants below zero.

    Gaussian weights with std scale/sqrt(fan_in), drawn by NumPy: jax.random run eagerly
    compiled its kernels afresh for every new shape (about 1 s a layer).
    """
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return jnp.asarray(scale * rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

    params = {name: normal((d, heads, head_dim), d) for name in ("wq", "wk", "wv")}
    params["wo"] = normal((heads, head_dim, d), heads * head_dim)
    return params, normal((tokens, d), 1.0)
