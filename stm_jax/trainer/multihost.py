"""One run over several processes (hosts): starting ``jax.distributed``, the primary process,
each process's rows of a batch, and agreeing on when to stop.

Every process runs the same ``train_and_evaluate`` on its own devices; ``jax.jit`` programs
span all of them. What must happen once per run happens on process 0, the *primary*: it
creates and locks the workdir, writes ``config.json``, ``vocab.json``, the metrics and the
summary, and prints. Orbax coordinates the checkpoints itself (each process writes its
shards, the primary the rest). A step each process must agree on is decided by a collective:

* ``on_primary``: the primary runs an action (create and lock the workdir); a mistake there
  is broadcast, so every process of the job raises the same one-line error. A second job on
  a busy workdir is refused this way: its primary cannot take the lock, and tells the others.
* ``StopVote``: at each step boundary every process casts whether it received SIGTERM or
  SIGINT, and all of them read the same ``any`` of the votes, so they stop (and save) at the
  same step even when the signals reach them at different moments.

The initial state and every batch are computed whole on every process, from the seed and
the step, and each process places only what its own devices hold (``place``,
``shard_batch``). The whole initial state passes through each process's memory once, which
suits models of this project's size; far larger ones would initialise under ``jax.jit``.

With one process all of this reduces to what a single run always did, with no collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax.errors import UserError

_MESSAGE_BYTES = 4096  # the longest error message broadcast from the primary


def validate_config(cfg) -> None:
    """``distributed``: all of coordinator_address, num_processes and process_id, or none."""
    given = [bool(cfg.coordinator_address), cfg.num_processes > 0, cfg.process_id >= 0]
    if any(given) and not all(given):
        raise UserError(
            f"distributed.coordinator_address={cfg.coordinator_address!r}, "
            f"distributed.num_processes={cfg.num_processes} and distributed.process_id="
            f"{cfg.process_id}: give all three (HOST:PORT, N and 0 <= I < N) or none of them "
            "(with distributed.enabled=True: detected on TPU pods, Slurm and MPI)")
    if all(given) and not cfg.process_id < cfg.num_processes:
        raise UserError(f"distributed.process_id={cfg.process_id} must be below "
                        f"distributed.num_processes={cfg.num_processes}")


def wanted(cfg) -> bool:
    """Whether the config asks for several processes."""
    return bool(cfg.enabled or cfg.coordinator_address)


def initialize(cfg) -> None:
    """``jax.distributed.initialize`` as ``config.distributed`` asks (nothing if it does not):
    with its three settings, or, left empty, detected from the TPU, Slurm or MPI environment.

    JAX's preemption service is turned off: SIGTERM belongs to ``preemption.StopRequest``,
    whose flag ``StopVote`` shares between the processes.
    """
    validate_config(cfg)
    if not wanted(cfg):
        return
    jax.config.update("jax_enable_preemption_service", False)
    given = (dict(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
             if cfg.coordinator_address else {})
    try:
        jax.distributed.initialize(**given)
    except (RuntimeError, ValueError) as error:  # no cluster found, or no coordinator answered
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = (f"check that process 0 runs and listens on {cfg.coordinator_address}, and "
                "that every process was given the same distributed settings" if given else
                "no TPU pod, Slurm or MPI environment was detected: give "
                "distributed.coordinator_address, num_processes and process_id")
        raise UserError(f"jax.distributed.initialize could not start ({detail[:300]}); "
                        f"{hint}") from None


def is_primary() -> bool:
    """Process 0: the one that writes the run's own files and prints."""
    return jax.process_index() == 0


def on_primary(action):
    """``action()`` on the primary only; a :class:`UserError` there is raised on every process
    (with the primary's message). Returns the action's result on the primary, else None."""
    result, failure = None, None
    if is_primary():
        try:
            result = action()
        except UserError as error:
            if jax.process_count() == 1:
                raise
            failure = error
    if jax.process_count() > 1:
        encoded = np.zeros(_MESSAGE_BYTES, np.uint8)
        raw = (str(failure) if failure else "").encode()[:_MESSAGE_BYTES]
        encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
        received = bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b"\0")
        if received:
            if failure is not None:
                raise failure
            raise UserError(received.decode(errors="replace"))
    return result


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows (first axis) of a global array that this process's devices hold."""
    spans = sorted({(index[0].start or 0, global_shape[0] if index[0].stop is None
                     else index[0].stop)
                    for index in sharding.addressable_devices_indices_map(
                        tuple(global_shape)).values()})
    start, stop = spans[0]
    for span_start, span_stop in spans[1:]:
        if span_start > stop:
            raise ValueError(f"this process's rows of {global_shape} are not contiguous: "
                             f"{spans}")
        stop = max(stop, span_stop)
    return slice(start, stop)


def shard_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global batch (the same on every process) as one sharded array, each process feeding
    only the rows its devices hold."""
    rows = local_rows(sharding, batch.shape)
    return jax.make_array_from_process_local_data(
        sharding, batch[rows], None if jax.process_count() == 1 else batch.shape)


def place(tree, shardings):
    """A tree that every process holds whole (the same values) placed as ``shardings`` say,
    each process putting only the shards of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


class StopVote:
    """All processes stop at the same step boundary (see the module docstring).

    With several processes, ``stop_now`` casts this boundary's vote and returns the outcome of
    the previous boundary's: the tally overlaps the next step instead of stalling the host, and
    every process sees the same outcome at the same boundary. With one process it returns the
    flag as it is.
    """

    def __init__(self, mesh: jax.sharding.Mesh):
        self._single = jax.process_count() == 1
        if self._single:
            return
        self._sharding = NamedSharding(mesh, P(mesh.axis_names))
        self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))
        self._local = jax.local_device_count()
        self._pending = None

    def stop_now(self, requested: bool) -> bool:
        if self._single:
            return requested
        votes = np.full((self._local,), requested)
        tally = self._any(jax.make_array_from_process_local_data(
            self._sharding, votes, (jax.device_count(),)))
        previous, self._pending = self._pending, tally
        return previous is not None and bool(previous)
