"""The custom-gradient slogdet against numpy and jnp.linalg.slogdet, and its LAPACK threads."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from stm_jax.core import logdet


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


_OPENBLAS_THREADS = """
import json, jax.numpy as jnp, stm_jax
from stm_jax.core import logdet
from threadpoolctl import threadpool_info
before = {lib["filepath"] for lib in threadpool_info()}
logdet.slogdet(jnp.eye(3))  # jaxlib loads scipy's OpenBLAS for its first LAPACK call
print(json.dumps([lib["num_threads"] for lib in threadpool_info()
                  if lib["internal_api"] == "openblas" and lib["filepath"] not in before]))
"""


@pytest.mark.parametrize("user_setting", [None, "2"])
def test_openblas_runs_one_thread_unless_the_user_says_otherwise(user_setting):
    """OpenBLAS threads fight XLA's for the cores (stm_jax/__init__.py): one by default."""
    pytest.importorskip("threadpoolctl")
    if user_setting is not None and (os.cpu_count() or 1) < 2:
        pytest.skip("OpenBLAS caps its threads at the core count")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user_setting is not None:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    done = subprocess.run([sys.executable, "-c", _OPENBLAS_THREADS], env=env, text=True,
                          capture_output=True, check=True)
    threads = json.loads(done.stdout.strip().splitlines()[-1])
    assert threads, "the first LAPACK call loaded no OpenBLAS library"
    assert set(threads) == {int(user_setting or 1)}
