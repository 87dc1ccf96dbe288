"""The training workdir: its files, the checks made before a run writes anything, and its lock.

A workdir belongs to one model: ``config.json`` (the whole config, vocabulary size included),
``vocab.json`` (or a subword run's ``tokenizer.json``), ``checkpoints/``, ``metrics.jsonl``
and ``train_summary.json``. Everything a run checks about it is read-only (``preflight``), so a
refused run leaves it as it was; only ``create`` writes, once every check has passed.

``read_config`` is the one place a saved config is read, and upgrades one written before a
key existed (``LEGACY_VALUES``).

Paths go through ``etils.epath`` (``files.as_path``), as Orbax's do: a workdir may be a
local folder or a bucket (``gs://bucket/run``), never a local folder named ``gs:``.

Two runs writing the same checkpoints and metrics file would interleave and corrupt each other,
so a run takes an exclusive ``fcntl.flock`` on ``workdir/.lock``. The kernel drops a flock when
the holding process exits for any reason, ``kill -9`` included, so there is never a stale lock to
delete by hand. A run of several processes takes it once, on process 0
(``multihost.on_primary``). flock is advisory and may not work across machines on some network
filesystems, and an object store (``gs://``) has no lock at all: a remote workdir is not locked,
and the run says so when it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from stm_jax import files
from stm_jax.errors import UserError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "train_summary.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_NAME = ".lock"

# Keys added to the configs after workdirs were already written, with the value that does
# what a run written before the key existed did. Not defaults (configs/common.py has those):
# barrier_sampling, for one, defaults to "per_sequence" but older runs drew "shared" subsets.
LEGACY_VALUES = {
    "microbatches": 1,
    "peak_flops": 0.0,
    "optimizer.decay_steps": -1,
    "objective.barrier_fraction": 1.0,
    "objective.barrier_sampling": "shared",
    "objective.barrier_step_fraction": 1.0,
    "objective.barrier_floor": float("-inf"),
    "objective.chunk_size": 0,
    "mesh.data": -1,  # every device, data parallel
    "mesh.fsdp": 1,
    "mesh.model": 1,
    "distributed.enabled": False,
    "distributed.coordinator_address": "",
    "distributed.num_processes": 0,
    "distributed.process_id": -1,
    "objective.barrier_target": "attention",
    "objective.prior_dim": 0,
    "objective.penalty": "log_barrier",
    "objective.penalty_cap": 30.0,
    "objective.margin_tau": 0.5,
    "objective.small_gain_knee": 0.9,
    "objective.train_noise_sigma": 0.0,
    "objective.train_noise_mode": "relative",
    "objective.fixed_noise_scale": 0.0,
    "model.first_layer_norm": True,
    "model.embed_init_std": 0.02,
    "optimizer.decay_embeddings": True,
    "model.attention_bias": False,
    "model.layer_norm_eps": 1e-6,
    "data.tokenizer": "char",
    "data.vocab_size": 8192,  # read only by "bpe" runs, which are all newer
    "data.cache_dir": "",
    "init_from": "",
}


class WorkdirError(UserError):
    """The workdir cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The saved config


def upgrade_config(saved: Mapping[str, Any]) -> dict:
    """A saved config (nested dict) with every key of ``LEGACY_VALUES`` it lacks filled in.

    ``distributed`` was a bool (call ``jax.distributed.initialize()``) before it became a
    section; it becomes ``{"enabled": that bool}``.
    """
    upgraded = files.from_json(dict(saved))
    if isinstance(upgraded.get("distributed"), bool):
        upgraded["distributed"] = {"enabled": upgraded["distributed"]}
    for key, value in LEGACY_VALUES.items():
        *sections, name = key.split(".")
        node = upgraded
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(name, value)
    return upgraded


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """``workdir/config.json`` as training saved it (vocabulary size included), upgraded."""
    path = files.as_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(
            f"{path} does not exist: {workdir} is not a training workdir (scripts/train.py "
            "writes config.json when it starts). Pass the --workdir a training run used.")
    try:
        saved = files.read_json(path)
    except (OSError, ValueError) as error:
        raise WorkdirError(f"{path} is unreadable ({error}); restore it, or use a fresh "
                           "--workdir") from None
    return ml_collections.ConfigDict(upgrade_config(saved))


def differences(saved: Mapping[str, Any], wanted: Mapping[str, Any],
                ignore: tuple[str, ...] = ()) -> list[str]:
    """``"model.d_model: 128 -> 64"`` for each flattened key whose value differs (keys
    starting with an ``ignore`` prefix are skipped)."""
    old, new = files.flatten(saved), files.flatten(wanted)
    keys = sorted(key for key in old.keys() | new.keys() if not key.startswith(ignore)
                  and old.get(key, "<absent>") != new.get(key, "<absent>"))
    return [f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}" for key in keys]


def checkpoint_metadata(config, vocab) -> dict:
    """What a checkpoint must agree on to be resumed: model shape and vocabulary (a subword
    tokenizer by the SHA-256 of its tokenizer.json)."""
    if vocab.kind != "char":
        return {"model": config.model.to_dict(), "tokenizer_sha256": vocab.sha256}
    return {"model": config.model.to_dict(), "vocab": "".join(vocab.chars),
            "vocab_unknown": vocab.unknown}


def upgrade_metadata(metadata: Mapping[str, Any]) -> dict:
    """A checkpoint's stored metadata with its model config upgraded like ``read_config``."""
    return {**metadata, "model": upgrade_config({"model": metadata.get("model", {})})["model"]}


# ---------------------------------------------------------------------------------------------
# Checks before a run, and creating the folder


def check_path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as a path, refused (without creating anything) if it cannot be a folder."""
    workdir = files.as_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists but is not a directory; pass a directory.")
    if not files.is_local(workdir):
        return workdir  # an object store: folders exist implicitly
    ancestor = workdir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not workdir.exists() and not ancestor.is_dir():
        raise WorkdirError(f"cannot create workdir {workdir}: {ancestor} is not a directory; "
                           "pass a path whose parent folders are directories.")
    return workdir


def preflight(workdir: str | os.PathLike, config) -> epath.Path:
    """Read-only checks of a workdir for ``config``: a usable path, and a saved config (if
    any) for the same model. Returns the path."""
    workdir = check_path(workdir)
    if not (workdir / CONFIG_FILE).exists():
        return workdir
    saved = read_config(workdir).model.to_dict()
    changed = differences({"model": saved}, {"model": config.model.to_dict()},
                          ignore=("model.vocab_size",))
    if changed:
        raise WorkdirError(f"{workdir / CONFIG_FILE} was written for a different model "
                           f"({', '.join(changed)}); use a fresh --workdir or the original "
                           "config")
    return workdir


def create(workdir: str | os.PathLike) -> epath.Path:
    """Creates the workdir if missing and checks it is writable; returns it resolved.

    Failing here, before compilation, beats failing at the first checkpoint.
    """
    workdir = check_path(workdir)
    if not files.is_local(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WorkdirError(
            f"cannot create workdir {workdir}: {error.strerror or error}. Check that the parent "
            "folders exist as directories and are writable, or pass another path."
        ) from error
    _check_writable(workdir)
    return workdir.resolve()


def resolve(workdir: str | os.PathLike) -> epath.Path:
    """The path ``create`` returns, for a workdir that exists (processes other than 0)."""
    workdir = files.as_path(workdir)
    return workdir.resolve() if files.is_local(workdir) else workdir


def _check_writable(workdir: Path) -> None:
    """Writes one byte to an anonymous temporary file, which leaves nothing behind.

    ``os.access`` is not enough: it ignores read-only mounts on some systems and root bypasses
    permission bits, whereas an actual write tests what the run will do.
    """
    try:
        with tempfile.TemporaryFile(dir=workdir) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as error:
        raise WorkdirError(
            f"workdir {workdir} is not writable: {error.strerror or error}. Fix its permissions "
            "or pass another path."
        ) from error


# ---------------------------------------------------------------------------------------------
# One run at a time


class WorkdirLock:
    """Exclusive, non-blocking lock on ``workdir/.lock`` for the life of a training run.

    The holder writes ``<pid> <hostname>`` into the file so a refused run can say who holds it.
    The file itself is never deleted: unlinking a lock file lets a third process lock a fresh
    inode while the old one is still held. A remote workdir (``gs://``) is not locked
    (``locks`` is False): an object store has no lock to take.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = files.as_path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.locks = files.is_local(self.workdir)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock or raises :class:`WorkdirError` naming the holder's pid."""
        if self._fd is not None or not self.locks:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(
                f"another training run holds the workdir {self.workdir} ({holder}, lock file "
                f"{self.path}). Two runs in one workdir would overwrite each other's "
                "checkpoints and metrics. Wait for that run to finish, stop it, or pass a "
                "different workdir. The lock is freed as soon as that process exits (even if it "
                "is killed), so there is no stale lock file to delete."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clears the pid and unlocks; closing the descriptor would unlock on its own too."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_holder(fd: int) -> str:
    """``pid 1234 on host x`` from the lock file, or a note that the holder has not written yet."""
    fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not fields:
        return "pid unknown: the holder has not written it yet"
    host = f" on host {fields[1]}" if len(fields) > 1 else ""
    return f"pid {fields[0]}{host}"


def take_workdir(workdir, stack: contextlib.ExitStack) -> None:
    """Creates and locks the workdir (on process 0) until ``stack`` closes."""
    lock = stack.enter_context(WorkdirLock(create(workdir)))
    if not lock.locks:
        print(f"warning: {workdir} is not on a local file system, so it is not locked: do not "
              "start a second run on it while this one runs", file=sys.stderr, flush=True)


def check_vocab_unchanged(workdir: os.PathLike, vocab) -> None:
    """Refuses to go on if the workdir's vocab.json (or tokenizer.json) is no longer ``vocab``
    (a ``data.Vocab`` or ``data.BPETokenizer``): another run may have written one between the
    data checks and taking the lock."""
    path = workdir / vocab.filename
    if path.exists() and type(vocab).load(path) != vocab:
        raise UserError(f"{path} changed while this run was starting (another run wrote a "
                        "different vocabulary); use a fresh --workdir")
