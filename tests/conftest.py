"""Shared fixtures: small random attention layers in float64 for oracle comparisons, and the
environment of ``scripts/train.py`` subprocesses."""

from pathlib import Path

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

    The law of ``attention.init_attention_params`` (std scale/sqrt(fan_in)), drawn by NumPy:
    that function's jax.random kernels compiled afresh for every new shape, eagerly or under
    jit (1-2 s a layer).
    """
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return jnp.asarray(scale * rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

    params = {name: normal((d, heads, head_dim), d) for name in ("wq", "wk", "wv")}
    params["wo"] = normal((heads, head_dim, d), heads * head_dim)
    return params, normal((tokens, d), 1.0)


def objective_cfg(variant: str = "ce", **overrides):
    """The objective section of the configs (configs/common.py), with ``overrides``."""
    from configs import common

    cfg = common.objective_config(variant)
    cfg.update(overrides)
    return cfg


def data_cfg(**overrides):
    """The data section of the configs (configs/common.py), with ``overrides``."""
    from configs import common

    cfg = common.base_config().data
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def env(request, tmp_path_factory):
    """``scripts/train.py``'s environment in subprocesses (``_train_helpers.train_env``), with a
    JAX compilation cache in pytest's cache folder, so only a setting's first run compiles."""
    from _train_helpers import train_env

    cache = request.config.cache
    cache_dir = (Path(cache.mkdir("jax_compilation_cache")) if cache is not None
                 else tmp_path_factory.mktemp("jax_compilation_cache"))
    return train_env(cache_dir)
