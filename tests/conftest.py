"""Shared fixtures: small random attention layers in float64 for oracle comparisons."""

import jax
import pytest

from stm_jax import attention


@pytest.fixture
def x64():
    """Run a test body in float64 (the autodiff oracles are compared to 1e-9)."""
    with jax.enable_x64(True):
        yield


def random_layer(seed: int, d: int, heads: int, head_dim: int, tokens: int, scale: float, dtype):
    """A random attention layer and input; a large scale puts some determinants below zero."""
    key_params, key_input = jax.random.split(jax.random.PRNGKey(seed))
    params = attention.init_attention_params(key_params, d, heads, head_dim, scale=scale,
                                             dtype=dtype)
    u = jax.random.normal(key_input, (tokens, d), dtype)
    return params, u
