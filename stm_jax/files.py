"""Files that a reader, or a crash, sees whole: atomic writes and strict JSON.

Results, summaries, configs, vocabularies and plots are written to a temp file in the same
folder, flushed to disk, then renamed with ``os.replace``: a reader sees the old content or the
new, never half. The temp name is made here (not by ``mkstemp``) so the file gets the umask's
permissions like any other.

Paths go through ``etils.epath`` (as Orbax's do), so ``gs://bucket/run/config.json`` stays a
bucket object instead of becoming a local folder ``gs:``. An object store has no rename, but
it replaces an object whole, so remote files are written directly (``is_local``).

JSON is strict (no bare ``NaN``, which strict readers reject) with one policy for non-finite
numbers everywhere: they are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` and
read back as floats. A NaN loss is exactly the record someone will want to read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from etils import epath

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def is_local(path: str | os.PathLike) -> bool:
    """False for a URL such as ``gs://bucket/run``: a path on a remote file system."""
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``, a local one with ``~`` expanded."""
    return epath.Path(path).expanduser() if is_local(path) else epath.Path(path)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` whole when the block ends (and not at
    all if it raises): for files written in pieces, such as token files. A remote object is
    written directly: an object store replaces an object whole."""
    if not is_local(path):
        with as_path(path).open("wb") as file:
            yield file
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    with open_atomic(path) as file:
        file.write(payload)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def to_json(value: Any) -> Any:
    """A strict-JSON copy: numpy and JAX scalars and arrays become Python numbers and lists,
    non-finite floats the strings "nan", "inf", "-inf"."""
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    array = np.asarray(value)  # pulls JAX arrays to the host
    if array.ndim:
        return [to_json(item) for item in array.tolist()]
    item = array.item()
    if isinstance(item, float) and not math.isfinite(item):
        return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
    return item


def from_json(value: Any) -> Any:
    """The inverse of ``to_json`` for non-finite numbers: "nan", "inf", "-inf" become floats."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [from_json(item) for item in value]
    if isinstance(value, dict):
        return {key: from_json(item) for key, item in value.items()}
    return value


def dumps(payload: Any, indent: int | None = 1) -> str:
    return json.dumps(to_json(payload), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1) -> None:
    write_text(path, dumps(payload, indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file as written by ``write_json`` (older files' bare NaN and Infinity too).

    Raises ``OSError`` or ``ValueError`` for a missing or malformed file.
    """
    return from_json(json.loads(as_path(path).read_text(encoding="utf-8")))


def read_json_or_none(path: str | os.PathLike) -> Any:
    """``read_json``, or None when the file is missing or half-written."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """One record as one line, flushed: a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(dumps(record, indent=None) + "\n")


def read_jsonl(path: str | os.PathLike) -> list:
    """Every record of a JSON-lines file in order; a line cut short by a crash is skipped."""
    path = as_path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(from_json(json.loads(line)))
        except ValueError:  # empty, or the fragment a killed write left
            continue
    return records


def write_png(path: str | os.PathLike, figure) -> None:
    """A matplotlib figure saved as PNG (110 dpi), atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
