"""stm_jax: stability-margin training of causal language models in JAX/Flax."""

import os

# jaxlib's CPU LAPACK kernels (the barrier's LU factorisations and triangular solves) call
# scipy's OpenBLAS once per small block, and OpenBLAS's own threads then fight XLA's for the
# same cores: on 2 cores one OpenBLAS thread made an estimator step (1/8 of the positions)
# 1.8x faster and an exact head-barrier step 1.3x. OpenBLAS reads this when scipy first loads
# it, which jax does lazily, so it is set before anything else here; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from stm_jax.core import attention, barrier  # noqa: E402

__all__ = ["attention", "barrier"]
__version__ = "0.1.0"
