"""TFDS builders written for this project; importing this package registers them with TFDS.

After ``import stm_jax.data.builders``, ``tfds.data_source('tiny_shakespeare_char/nanogpt',
data_dir=...)`` and ``tfds.builder('wikitext2_raw_char/proxy', ...)`` find them by name.
"""

from stm_jax.data.builders.tiny_shakespeare_char import TinyShakespeareChar
from stm_jax.data.builders.wikitext2_raw_char import Wikitext2RawChar

__all__ = ["TinyShakespeareChar", "Wikitext2RawChar"]
