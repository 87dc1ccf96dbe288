"""Write a file so that a reader, or a crash, sees its old content or its new, never half.

Results, summaries, vocabularies and configs are all written this way: a temp file in the same
folder, flushed to disk, then ``os.replace``. The temp name is made here (not by ``mkstemp``)
so the file gets the umask's permissions like any other.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
