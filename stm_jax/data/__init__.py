"""Character-level data: the vocabulary, the text splits, training batches, evaluation windows.

Everything the model sees goes through here, so that training, evaluation and sampling agree.
"""

from stm_jax.data.batches import check_split_length, eval_batches, get_batch, num_eval_batches
from stm_jax.data.splits import DATASET_NAMES, load_dataset, read_text_file
from stm_jax.data.vocab import UNKNOWN_CHAR, VOCAB_FILENAME, Vocab

__all__ = ["DATASET_NAMES", "UNKNOWN_CHAR", "VOCAB_FILENAME", "Vocab", "check_split_length",
           "eval_batches", "get_batch", "load_dataset", "num_eval_batches", "read_text_file"]
