"""stm_jax: stability-margin training of causal language models in JAX/Flax.

The package is laid out in rings, each importing only from the rings inside it:
``core`` (the paper's mathematics) <- ``model``, ``data`` <- ``objective``, ``pretrained``
(GPT-2 checkpoints) <- ``trainer`` <- ``evaluation`` <- ``bench``, ``study``; ``errors`` and
``files`` serve them all. The README's
Architecture section walks through them.
"""

import os

# jaxlib's CPU LAPACK kernels (the barrier's LU factorisations and triangular solves) call
# scipy's OpenBLAS once per small block, and OpenBLAS's own threads then fight XLA's for the
# same cores (benchmarks/ measures the difference). OpenBLAS reads this when scipy first loads
# it, which jax does lazily, so it is set before anything else here; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__all__ = ["attention", "barrier", "logdet"]
__version__ = "0.1.0"
_CORE_MODULES = ("attention", "barrier", "logdet")


def __getattr__(name: str):
    """``from stm_jax import attention`` (and barrier, logdet) for older notebooks and scripts:
    the modules live in ``stm_jax.core``; imported on first use, so that ``import stm_jax``
    alone loads no JAX."""
    if name in _CORE_MODULES:
        import importlib

        return importlib.import_module(f"stm_jax.core.{name}")
    raise AttributeError(f"module 'stm_jax' has no attribute {name!r}")
