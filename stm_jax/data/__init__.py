"""The data: vocabularies and tokenizers, the text splits, training batches, evaluation windows.

Everything the model sees goes through here, so that training, evaluation and sampling agree.
``vocab`` and ``batches`` need only NumPy; ``splits`` (reading the configured text, through
TFDS builders for the named corpora) is imported on first use, so that code that only decodes
ids does not load TensorFlow Datasets.
"""

from stm_jax.data.batches import check_split_length, eval_batches, get_batch, num_eval_batches
from stm_jax.data.tokenizer import TOKENIZER_FILENAME, BPETokenizer
from stm_jax.data.vocab import UNKNOWN_CHAR, VOCAB_FILENAME, Vocab

_FROM_SPLITS = ("DATASET_NAMES", "dataset_name", "load_dataset", "read_text_file",
                "validate_config")

__all__ = ["TOKENIZER_FILENAME", "UNKNOWN_CHAR", "VOCAB_FILENAME", "BPETokenizer", "Vocab",
           "check_split_length", "eval_batches", "get_batch", "num_eval_batches",
           *_FROM_SPLITS]


def __getattr__(name: str):
    if name in _FROM_SPLITS:
        from stm_jax.data import splits

        return getattr(splits, name)
    raise AttributeError(f"module 'stm_jax.data' has no attribute {name!r}")
