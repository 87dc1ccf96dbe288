"""Orbax checkpoints of the training state, with errors a person can act on.

A checkpoint step holds two items: ``state`` (any pytree of arrays: params, optimizer state,
step counter) and ``metadata`` (a small JSON dict such as the model config and vocabulary size).
The metadata is checked before any array is read, so pointing a run at a workdir written for a
different model fails with a sentence naming the differing keys instead of a shape error from
deep inside TensorStore.

Every failure on the restore path raises :class:`CheckpointError` and leaves the files exactly as
they were: nothing is deleted, overwritten or "repaired". The person deciding what to do with a
damaged checkpoint should be able to inspect it.

Orbax behaviour this module relies on (orbax-checkpoint 0.12):

* A save writes into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when complete,
  so a save killed half-way leaves only a tmp folder, which Orbax never lists as a step. A later
  save of the *same* step removes that leftover folder first (Orbax logs a warning).
* An async save copies the arrays to host memory before ``save`` returns (buffers may then be
  donated), and writes files on a background thread. Orbax lists the step as soon as the save
  starts, hence :meth:`Checkpointer.latest_step` waits for the write to finish first. A process
  that exits without waiting loses that save, so use the class as a context manager.
* Sharded arrays are saved as they lie: with several processes each writes the shards its
  devices hold and process 0 the metadata, every process calling ``save`` and ``restore``
  alike. A restore places the arrays as the shardings of its abstract state ask, on any mesh
  or number of devices, whatever mesh saved them.
* The directory is an ``etils.epath`` path: local, or a bucket (``gs://``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from stm_jax import files
from stm_jax.errors import UserError

_STATE = "state"
_METADATA = "metadata"
_MAX_LISTED = 5  # differing leaves / keys named in one error message


class CheckpointError(UserError):
    """A checkpoint cannot be restored into this run; the message says which, why and what next."""


class Checkpointer:
    """Saves and restores ``(state, metadata)`` under ``directory/<step>``.

    ``save_interval_steps`` lets the training loop call :meth:`save` every step and only write
    every K-th one; ``force=True`` saves regardless (final and preemption saves).
    ``max_to_keep=None`` keeps every checkpoint.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        self.directory = files.as_path(directory)
        if files.is_local(self.directory):
            self.directory = self.directory.absolute()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Orbax's default policy would also save whatever step comes first into an empty
            # directory; a run should write exactly the steps it was configured to. A
            # preempted run's step is saved with force=True once every process has agreed
            # on it (trainer/multihost.py), not by Orbax's preemption policy.
            save_decision_policy=policies.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Registering the handlers up front lets a fresh process read a step's tree metadata
        # before it has restored anything.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def step_path(self, step: int) -> epath.Path:
        """The folder a complete checkpoint of ``step`` lives in."""
        return self.directory / str(int(step))

    def all_steps(self) -> list[int]:
        """Complete checkpoints, oldest first (waits for an in-flight save)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint or None; a killed save's tmp folder is ignored."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self, step: int, state: Any, *, metadata: Mapping[str, Any], force: bool = False
    ) -> bool:
        """Starts saving ``state`` and ``metadata`` at ``step``; returns whether a save started.

        Without ``force`` only multiples of ``save_interval_steps`` are written. A step that is
        already saved is skipped (the last interval save and the final forced save often
        coincide). The metadata is checked to be JSON here, so a bad value fails in the caller
        rather than on the background thread.
        """
        step = int(step)
        metadata = _as_json(metadata)
        steps = self._manager.all_steps()
        if step in steps:
            return False
        if force and steps and step < max(steps):
            raise CheckpointError(
                f"refusing to save step {step} into {self.directory}: it already holds the newer "
                f"step {max(steps)}, and keeping the latest checkpoints would delete this one. "
                "Resume from the latest step or use a fresh workdir."
            )
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
        )
        return bool(self._manager.save(step, args=args, force=force))

    def restore(
        self,
        step: int,
        abstract_state: Any,
        *,
        expected_metadata: Mapping[str, Any] | None = None,
        upgrade_metadata: Callable[[dict], dict] | None = None,
    ) -> tuple[Any, dict]:
        """Reads ``step`` into the structure, shapes, dtypes and shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (give them a ``sharding``, e.g.
        replicated for data parallelism, and the arrays are placed with it) or of concrete arrays.
        Checks, in order: the step exists, the metadata (passed through ``upgrade_metadata``
        first, when given: an older checkpoint's) equals ``expected_metadata`` (when given),
        the tree matches leaf by leaf; only then are arrays read. Raises
        :class:`CheckpointError` on any failure and never touches the files.
        """
        step = int(step)
        path = self.step_path(step)
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"there is no complete checkpoint {path}; complete steps in {self.directory}: "
                f"{steps or 'none'}."
            )
        if not (path / _METADATA).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has no '{_METADATA}' item, so it was not written by "
                "stm_jax.trainer.checkpointing and cannot be checked against this run. The "
                "workdir was left untouched; use a fresh workdir."
            )
        metadata_args = ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        metadata = self._read(step, path, metadata_args)[_METADATA]
        if upgrade_metadata is not None:
            metadata = upgrade_metadata(metadata)
        if expected_metadata is not None:
            _check_metadata(path, metadata, _as_json(expected_metadata))
        _check_tree(path, self._tree_metadata(step, path), abstract_state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
        state = self._read(step, path, args)[_STATE]
        return state, metadata

    def _tree_metadata(self, step: int, path: epath.Path) -> Any:
        """The stored tree of shapes and dtypes, read without touching any array data."""
        try:
            tree_metadata = self._manager.metadata(step).item_metadata[_STATE]
            if tree_metadata is None:  # Orbax returns None when the tree's metadata file is gone
                raise FileNotFoundError(f"no tree metadata in {path / _STATE}")
        except Exception as error:  # any read failure means a damaged checkpoint
            raise CheckpointError(_unreadable_message(path, error, self.all_steps())) from error
        return tree_metadata

    def _read(self, step: int, path: epath.Path, args: ocp.args.Composite) -> Any:
        """``manager.restore`` with every exception turned into a damaged-checkpoint error."""
        try:
            return self._manager.restore(step, args=args)
        except Exception as error:  # Orbax and TensorStore raise many types
            _silence_abandoned_reads()
            raise CheckpointError(_unreadable_message(path, error, self.all_steps())) from error

    def wait(self) -> None:
        """Blocks until an in-flight async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes any in-flight save and releases Orbax's threads."""
        self.wait()
        self._manager.close()


def _as_json(metadata: Mapping[str, Any]) -> dict:
    """The dict as it reads back from JSON (tuples become lists), so comparisons are exact."""
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint metadata must be plain JSON: {error}") from error


def _check_metadata(path: epath.Path, found: Mapping[str, Any],
                    expected: Mapping[str, Any]) -> None:
    """Raises naming every key whose value differs, or that only one side has."""
    found_flat, expected_flat = files.flatten(found), files.flatten(expected)
    missing = object()
    differing = [
        key
        for key in sorted(found_flat.keys() | expected_flat.keys())
        if found_flat.get(key, missing) != expected_flat.get(key, missing)
    ]
    if not differing:
        return

    def describe(key: str) -> str:
        old = found_flat.get(key, "<absent>")
        new = expected_flat.get(key, "<absent>")
        return f"{key}={old!r}, the config asks for {new!r}"

    raise CheckpointError(
        f"checkpoint {path} was written for {describe(differing[0])}"
        + "".join(f"; {describe(key)}" for key in differing[1:])
        + f" (differing keys: {', '.join(differing)}). Nothing was restored and the workdir was "
        "left untouched. Run with the configuration the checkpoint was written for, or start "
        "the new configuration in a fresh workdir."
    )


def _path_name(key_path: tuple) -> str:
    """``('opt_state', 0, 'mu', 'w')`` as ``opt_state.0.mu.w``, the same for dicts, tuples and
    attribute nodes (Orbax stores NamedTuple fields as dict keys)."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(key_path): leaf for key_path, leaf in leaves}


def _describe_leaf(leaf: Any) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None:
        return type(leaf).__name__
    return f"{tuple(shape)} {np.dtype(dtype).name if dtype is not None else ''}".strip()


def _leaf_matches(stored: Any, wanted: Any) -> bool:
    """Shapes and dtypes must agree; Python scalars carry no dtype and restore as asked."""
    if isinstance(stored, ocp.metadata.ScalarMetadata) or not hasattr(wanted, "shape"):
        return True
    if tuple(stored.shape) != tuple(wanted.shape):
        return False
    wanted_dtype = getattr(wanted, "dtype", None)
    return wanted_dtype is None or np.dtype(stored.dtype) == np.dtype(wanted_dtype)


def _first_few(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_tree(path: epath.Path, tree_metadata: Any, abstract_state: Any) -> None:
    """Raises naming the first few leaves of another shape/dtype, missing or extra.

    Orbax would silently cast a dtype and report only one structural problem at a time.
    """
    stored = _leaves_by_name(getattr(tree_metadata, "tree", tree_metadata))
    wanted = _leaves_by_name(abstract_state)
    differing = [
        f"{name} is {_describe_leaf(stored[name])} in the checkpoint, this run expects "
        f"{_describe_leaf(wanted[name])}"
        for name in wanted
        if name in stored and not _leaf_matches(stored[name], wanted[name])
    ]
    missing = [name for name in wanted if name not in stored]
    extra = [name for name in stored if name not in wanted]
    problems = differing[:_MAX_LISTED]
    if len(differing) > _MAX_LISTED:
        problems.append(f"{len(differing) - _MAX_LISTED} more leaves differ")
    if missing:
        problems.append(f"missing from the checkpoint: {_first_few(missing)}")
    if extra:
        problems.append(f"only in the checkpoint: {_first_few(extra)}")
    if not problems:
        return
    raise CheckpointError(
        f"checkpoint {path} does not match the state this run builds: {'; '.join(problems)}. "
        "Nothing was restored and the workdir was left untouched. The model or optimizer "
        "configuration probably changed since the checkpoint was written; run with the "
        "original configuration or start in a fresh workdir."
    )


def _silence_abandoned_reads() -> None:
    """A failed restore leaves Orbax's other array reads to fail when they are collected, at
    exit, each printing "Exception ignored in" and a traceback after the one error line that
    already names the damaged checkpoint. Drop those reports; others go to the previous hook.
    Installed once per process, however many restores fail."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if getattr(code, "co_name", None) != "_read_array_index_and_device_put":
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception: TensorStore's own message says which file and byte range failed,
    while Orbax's wrapper mostly repeats the array spec."""
    for _ in range(10):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


def _unreadable_message(path: epath.Path, error: Exception, steps: list[int]) -> str:
    root = _root_cause(error)
    lines = str(root).strip().splitlines()
    detail = f"{type(root).__name__}: {lines[0][:400] if lines else ''}".rstrip(": ")
    others = [step for step in steps if str(step) != path.name]
    return (
        f"could not read checkpoint {path}: {detail}. Its files look "
        "truncated or corrupt (an interrupted copy, a full disk or a bad sync). The workdir was "
        "left untouched: nothing was deleted or repaired. Restore another step "
        f"(other complete steps: {others or 'none'}) or move this step folder aside by hand "
        "after inspecting it."
    )
