"""The character vocabulary: ids in code-point order, an optional unknown id, saved as JSON.

A checkpoint's token ids mean the characters of the vocabulary it was trained with, so the
vocabulary is stored in the workdir (``vocab.json``) and reused by every later run, evaluation
and sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np

from stm_jax import files
from stm_jax.errors import UserError

VOCAB_FILENAME = "vocab.json"
UNKNOWN_CHAR = "\ufffd"  # how the unknown id decodes (U+FFFD REPLACEMENT CHARACTER)
_VOCAB_FORMAT = "stm_jax.vocab/1"
_MAX_LISTED_CHARS = 20


# Vocabulary


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Characters sorted by code point; id i is ``chars[i]``.

    With ``unknown=True`` one extra id, ``size - 1``, stands for every character not in
    ``chars``; it decodes to U+FFFD. Without it, encoding an unknown character is an error.
    """

    chars: tuple[str, ...]
    unknown: bool = False
    _codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "char"  # data.tokenizer
    filename: ClassVar[str] = VOCAB_FILENAME

    def __post_init__(self):
        chars = tuple(self.chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters")
        if list(chars) != sorted(set(chars)):
            raise ValueError("vocabulary characters must be unique and sorted by code point")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_codes", np.array([ord(c) for c in chars], dtype=np.uint32))

    @classmethod
    def from_text(cls, text: str, *, unknown: bool = False) -> Vocab:
        """The vocabulary of the distinct characters in ``text``."""
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls(tuple(sorted(set(text))), unknown=unknown)

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.chars) + int(self.unknown)

    @property
    def unknown_id(self) -> int | None:
        return self.size - 1 if self.unknown else None

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id's character (the unknown id counts as U+FFFD's 3)."""
        chars = self.chars + ((UNKNOWN_CHAR,) if self.unknown else ())
        return np.array([len(c.encode("utf-8", errors="surrogatepass")) for c in chars],
                        np.int64)

    def pieces(self, ids) -> list[str]:
        """The character of each id."""
        return list(self.decode(np.asarray(ids)))

    def describe(self) -> str:
        return f"characters, {self.size} ids"

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` as int32 (vectorised: no Python loop per char)."""
        codes = _code_points(text)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        known = self._codes[pos] == codes
        ids = pos.astype(np.int32)
        if not known.all():
            if not self.unknown:
                raise ValueError("characters not in the vocabulary: " + list_chars(codes[~known]))
            ids[~known] = self.size - 1
        return ids

    def decode(self, ids: Any) -> str:
        """The text of a 1-D sequence of ids (numpy, JAX or list)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"decode takes a 1-D integer sequence, got {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(
                f"ids outside the vocabulary [0, {self.size}): {np.unique(ids[bad])[:10].tolist()}"
            )
        table = self._codes
        if self.unknown:
            table = np.append(table, np.uint32(ord(UNKNOWN_CHAR)))
        return (
            table[ids.astype(np.int64)]
            .astype("<u4")
            .tobytes()
            .decode("utf-32-le", errors="surrogatepass")
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON atomically (temp file + rename): a crash never leaves half a vocab."""
        payload = {"format": _VOCAB_FORMAT, "unknown": self.unknown, "chars": list(self.chars)}
        files.write_text(path, json.dumps(payload) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Reads a file written by `save`; a malformed file is a ValueError naming it."""
        path = files.as_path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != _VOCAB_FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, not {_VOCAB_FORMAT!r}")
            return cls(tuple(payload["chars"]), unknown=bool(payload["unknown"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"{path} is not a valid vocabulary file ({err}); delete it to rebuild the "
                "vocabulary from the train split, or restore the original."
            ) from None


def _code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as uint32, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


def list_chars(codes: np.ndarray) -> str:
    """The distinct characters in ``codes`` in order of first appearance, as Python literals."""
    distinct, first = np.unique(codes, return_index=True)
    ordered = distinct[np.argsort(first)]
    listed = ", ".join(repr(chr(c)) for c in ordered[:_MAX_LISTED_CHARS])
    if len(ordered) > _MAX_LISTED_CHARS:
        listed += f" and {len(ordered) - _MAX_LISTED_CHARS} more"
    return listed

