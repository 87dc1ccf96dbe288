"""Byte-level BPE tokenizers (GPT-2's kind), trained or read with the ``tokenizers`` library.

``data.tokenizer`` chooses what a run reads: ``"char"`` (the character ``Vocab``), ``"bpe"``
(a byte-level BPE of ``data.vocab_size`` tokens trained on the train split) or the path of an
existing ``tokenizer.json`` (GPT-2's, say). A BPE run keeps its tokenizer in the workdir as
``tokenizer.json`` and every later run, evaluation and sample reads that file; its SHA-256 is
the tokenizer's identity in checkpoints and in the token cache.

Byte-level BPE maps every byte to a symbol before merging, so any Unicode text round-trips:
``decode(encode(text)) == text``. Only such tokenizers are accepted, because they give every
token an exact number of UTF-8 bytes (``token_bytes``), which bits per byte needs.

Long texts are encoded in chunks cut where GPT-2's pre-tokenizer must cut anyway (after a
newline that follows and precedes a non-space), so the ids are those of the whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from stm_jax import files
from stm_jax.errors import UserError

TOKENIZER_FILENAME = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET = 256
# Cut points: after "\n" between two non-space characters, else before " x" after a non-space.
_LINE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
CHUNK_CHARS = 16384  # target chunk: large enough to amortise the call, small enough to spread


def _symbols_of_bytes() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for
    the code points from 256 on, in order (the table ``tokenizers``' ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(BYTE_ALPHABET) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(BYTE_ALPHABET + i) for i, b in enumerate(others)})
    return table


_BYTE_OF_SYMBOL = {symbol: byte for byte, symbol in _symbols_of_bytes().items()}


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the interface of ``Vocab``."""

    kind = "bpe"
    unknown = False
    unknown_id = None

    def __init__(self, serialized: str, source: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        try:
            spec = json.loads(serialized)
            self._tokenizer = Tokenizer.from_str(serialized)
        except Exception as error:  # tokenizers raises plain Exceptions for bad files
            raise UserError(f"{source} is not a tokenizers JSON file ({error}); pass GPT-2's "
                            "tokenizer.json or one written by stm_jax.") from None
        decoder = (spec.get("decoder") or {}).get("type")
        model = (spec.get("model") or {}).get("type")
        if model != "BPE" or decoder != "ByteLevel":
            raise UserError(f"{source} is a {model} tokenizer with a {decoder} decoder; only "
                            "byte-level BPE tokenizers (GPT-2's kind) are supported, as only "
                            "they round-trip any text.")
        self.serialized = serialized
        self.sha256 = hashlib.sha256(serialized.encode("utf-8")).hexdigest()
        self.size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._added = {i: token.content for i, token in
                       self._tokenizer.get_added_tokens_decoder().items()}
        self.token_bytes = self._byte_lengths()

    def _byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: one per symbol of a byte-level token, an added
        token's text otherwise."""
        lengths = np.zeros(self.size, np.int64)
        for index in range(self.size):
            token = self._tokenizer.id_to_token(index)
            if index in self._added:
                lengths[index] = len(self._added[index].encode("utf-8"))
            elif token is not None:
                lengths[index] = len(token)
        return lengths

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and other.sha256 == self.sha256

    __hash__ = None  # mutable wrapper: equal by content, not usable as a key

    filename = TOKENIZER_FILENAME

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens."""
        return np.dtype(np.uint16 if self.size <= 2**16 else np.uint32)

    def describe(self) -> str:
        return f"byte-level BPE, {self.size:,} tokens (sha256 {self.sha256[:12]})"

    # Encoding and decoding

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as int32."""
        return self.encode_chunks(split_chunks(text)).astype(np.int32)

    def encode_chunks(self, chunks: list[str]) -> np.ndarray:
        """Ids of the concatenated ``chunks`` (cut by ``split_chunks``), in ``dtype``."""
        if not chunks:
            return np.zeros(0, self.dtype)
        encodings = self._tokenizer.encode_batch_fast(chunks, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, self.dtype) for e in encodings])

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D integer sequence, got shape {ids.shape}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(f"ids outside the vocabulary [0, {self.size}): "
                             f"{np.unique(ids[bad])[:10].tolist()}")
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def token_bytes_of(self, index: int) -> bytes:
        """The UTF-8 bytes one id stands for."""
        index = int(index)
        if index in self._added:
            return self._added[index].encode("utf-8")
        return bytes(_BYTE_OF_SYMBOL[symbol] for symbol in self._tokenizer.id_to_token(index))

    def pieces(self, ids) -> list[str]:
        """The text of each id in context: the characters that end in it, so the pieces
        join to ``decode(ids)`` and a token holding part of a character is ""."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [decoder.decode(self.token_bytes_of(index)) for index in np.asarray(ids)]
        if pieces:
            pieces[-1] += decoder.decode(b"", final=True)
        return pieces

    # Files

    def save(self, path: str | os.PathLike) -> None:
        files.write_text(path, self.serialized)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the path of a tokenizer.json.")
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{path} is not a readable UTF-8 tokenizer.json ({error}).") \
                from None
        return cls(text, str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """A byte-level BPE of at most ``vocab_size`` tokens (256 bytes, <|endoftext|>, merges)
        trained on ``texts`` (an iterator of chunks: the text need not fit in memory)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer.to_str())


def split_chunks(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``target`` characters at pre-token boundaries."""
    return list(iter_chunks(text, target, final=True)[0])


def iter_chunks(text: str, target: int = CHUNK_CHARS, *, final: bool
                ) -> tuple[Iterator[str], str]:
    """(chunks, rest): with ``final=False`` the text after the last cut is returned as
    ``rest``, to be continued by the next block of a stream."""
    pieces, start = [], 0
    while len(text) - start > target:
        # A newline within a few targets, else a space: both end a pre-token (module doc).
        cut = (_LINE_CUT.search(text, start + target, start + 4 * target)
               or _SPACE_CUT.search(text, start + target))
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    rest = text[start:]
    if final:
        if rest:
            pieces.append(rest)
        rest = ""
    return iter(pieces), rest
