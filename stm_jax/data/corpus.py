"""Token files: each split encoded once into a memory-mapped file, cached by text and tokenizer.

A subword run's splits are ``np.memmap`` arrays of uint16 ids (uint32 when the vocabulary has
more than 65,536 tokens) in ``data.cache_dir``, one file per split text and tokenizer:
``<cache>/<tokenizer sha256>/<text sha256>.bin`` beside a small JSON that says how many tokens
and bytes it holds (written last, so a file without one was cut short and is encoded again).
``batches.get_batch`` indexes the map, so only the windows of a batch are read.

A text file is streamed, never read whole: one pass hashes it, checks it is UTF-8 and counts its
characters (the split point is the same character index a character run uses), then each split's
byte range is decoded and encoded block by block.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stm_jax import files
from stm_jax.data.tokenizer import BPETokenizer, iter_chunks
from stm_jax.errors import UserError

BLOCK_BYTES = 4 << 20  # bytes read and encoded at a time (a batch of chunks per call)
_FORMAT = "stm_jax.tokens/1"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stm_jax/tokens`` (``~/.cache`` when unset): what ``data.cache_dir=""``
    means."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stm_jax" / "tokens"


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A split's text: bytes ``start:end`` of a UTF-8 file, or a string in memory."""

    description: str
    sha256: str  # of the text (for a file range: of the file and the range)
    num_bytes: int
    num_chars: int
    path: Path | None = None
    start: int = 0
    end: int = 0
    text: str | None = None

    @classmethod
    def of_text(cls, text: str, description: str) -> TextSource:
        data = text.encode("utf-8")
        return cls(description, hashlib.sha256(data).hexdigest(), len(data), len(text),
                   text=text)

    def blocks(self, size: int = BLOCK_BYTES) -> Iterator[str]:
        """The text in pieces of about ``size`` bytes (characters for a string)."""
        if self.text is not None:
            for start in range(0, len(self.text), size):
                yield self.text[start:start + size]
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(self.path, "rb") as file:
            file.seek(self.start)
            remaining = self.end - self.start
            while remaining > 0:
                data = file.read(min(size, remaining))
                remaining -= len(data)
                yield decoder.decode(data, final=remaining <= 0 or not data)
                if not data:
                    return


# ---------------------------------------------------------------------------------------------
# Text files, streamed


def scan_text_file(path: Path) -> tuple[str, int, int]:
    """(sha256, bytes, characters) of a UTF-8 file, read in blocks; a byte sequence that is not
    UTF-8 is a UserError naming its offset."""
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    num_bytes = num_chars = 0
    with open(path, "rb") as file:
        while True:
            data = file.read(BLOCK_BYTES)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:
                offset = num_bytes + error.start
                raise UserError(f"data.text_file {str(path)!r} is not UTF-8 text (byte "
                                f"{offset:,}: {error.reason}); convert it to UTF-8.") from None
            if not data:
                return digest.hexdigest(), num_bytes, num_chars
            digest.update(data)
            num_bytes += len(data)
            num_chars += _count_chars(data)


def _count_chars(data: bytes) -> int:
    """Characters in valid UTF-8: the bytes that do not continue a character."""
    return int(np.count_nonzero((np.frombuffer(data, np.uint8) & 0xC0) != 0x80))


def byte_offset_of_char(path: Path, char_index: int) -> int:
    """The byte at which character ``char_index`` of a UTF-8 file starts."""
    seen = offset = 0
    with open(path, "rb") as file:
        while data := file.read(BLOCK_BYTES):
            starts = np.flatnonzero((np.frombuffer(data, np.uint8) & 0xC0) != 0x80)
            if seen + len(starts) > char_index:
                return offset + int(starts[char_index - seen])
            seen += len(starts)
            offset += len(data)
    return offset


def text_file_sources(path: Path, val_fraction: float) -> dict[str, TextSource]:
    """The train and validation parts of a text file, split where ``splits`` splits the text
    (the first ``int(chars * (1 - val_fraction))`` characters train), without reading it
    into memory."""
    sha, num_bytes, num_chars = scan_text_file(path)
    train_chars = int(num_chars * (1.0 - val_fraction))
    cut = byte_offset_of_char(path, train_chars)
    ranges = {"train": (0, cut, train_chars), "validation": (cut, num_bytes,
                                                           num_chars - train_chars)}
    return {split: TextSource(
        f"{path} [{split}]", hashlib.sha256(f"{sha}:{start}:{end}".encode()).hexdigest(),
        end - start, chars, path=path, start=start, end=end)
        for split, (start, end, chars) in ranges.items()}


# ---------------------------------------------------------------------------------------------
# Token files


def token_file(cache_dir: Path, source: TextSource, tokenizer: BPETokenizer) -> Path:
    return Path(cache_dir) / tokenizer.sha256[:32] / f"{source.sha256[:32]}.bin"


def encode_to_file(source: TextSource, tokenizer: BPETokenizer, cache_dir: str | Path, *,
                   progress: bool = False) -> np.memmap:
    """The ids of ``source`` as a read-only memory map, encoded on first use.

    A progress bar on stderr follows the bytes encoded (``progress``). The file is written
    under a temporary name and renamed when complete.
    """
    path = token_file(Path(cache_dir).expanduser(), source, tokenizer)
    meta_path = path.with_suffix(".json")
    meta = files.read_json_or_none(meta_path)
    if not (meta and meta.get("format") == _FORMAT and path.is_file()
            and path.stat().st_size == meta["tokens"] * tokenizer.dtype.itemsize):
        meta = _encode(source, tokenizer, path, progress)
        files.write_json(meta_path, meta)
    return np.memmap(path, dtype=tokenizer.dtype, mode="r", shape=(meta["tokens"],)) \
        if meta["tokens"] else np.zeros(0, tokenizer.dtype)


def chunk_batches(source: TextSource) -> Iterator[tuple[list[str], int]]:
    """(chunks cut at pre-token boundaries, bytes read) per block of ``source``."""
    rest = ""
    for block in source.blocks():
        chunks, rest = iter_chunks(rest + block, final=False)
        yield list(chunks), len(block.encode("utf-8"))
    yield list(iter_chunks(rest, final=True)[0]), 0


def chunks(source: TextSource) -> Iterator[str]:
    """The chunks of ``source`` one by one (BPE training reads them)."""
    for batch, _ in chunk_batches(source):
        yield from batch


def _encode(source: TextSource, tokenizer: BPETokenizer, path: Path, progress: bool) -> dict:
    from tqdm import tqdm

    count = 0
    bar = tqdm(total=source.num_bytes, unit="B", unit_scale=True, file=sys.stderr,
               desc=f"encoding {source.description}", disable=not progress, leave=False)
    try:
        with files.open_atomic(path) as out, bar:
            for chunks, num_bytes in chunk_batches(source):
                ids = tokenizer.encode_chunks(chunks)
                out.write(ids.tobytes())
                count += len(ids)
                bar.update(num_bytes)
    except PermissionError as error:
        raise UserError(f"cannot write the token cache {path.parent}: {error.strerror}; set "
                        "data.cache_dir to a writable folder.") from None
    return {"format": _FORMAT, "tokens": count, "bytes": source.num_bytes,
            "chars": source.num_chars, "dtype": tokenizer.dtype.name,
            "tokenizer_sha256": tokenizer.sha256, "text_sha256": source.sha256,
            "source": source.description}
