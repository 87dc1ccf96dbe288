"""stm_jax: stability-margin training of causal language models in JAX/Flax."""

from stm_jax import attention, barrier

__all__ = ["attention", "barrier"]
__version__ = "0.1.0"
