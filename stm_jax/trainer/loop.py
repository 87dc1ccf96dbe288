"""``train_and_evaluate(config, workdir)``: the training loop behind ``scripts/train.py``.

Data parallel over every local device with ``jax.jit`` on a ``('data',)`` mesh: parameters
and optimizer state replicated, batches sharded on their first axis. Orbax checkpoints every
``checkpoint_every`` steps and at the end; a rerun with the same workdir resumes from the
latest complete checkpoint and, since batches and dropout are functions of (seed, step),
finishes with the same parameters as an uninterrupted run.

What a run does when something goes wrong:

* Every check comes before anything is written: the config, the data (readable UTF-8, splits
  long enough for a training window and an evaluation batch), the workdir path, the vocabulary
  and config a reused workdir was written with, and the latest checkpoint (metadata, tree and
  arrays are restored before the run writes a byte). A failure is one sentence naming the
  problem and the fix, and leaves the workdir as it was (a fresh one is not even created).
* SIGTERM or SIGINT (preemption, Ctrl-C) stops at the next step boundary, saves that step and
  returns ``status="preempted"``; rerunning the same command resumes. A second signal ends
  the process at once without saving.
* A killed run (``kill -9``, out of memory, power loss of the host) loses only the steps after
  its last complete checkpoint: Orbax writes each step into a temporary folder and renames it
  when complete, and ``vocab.json``, ``config.json`` and ``train_summary.json`` are replaced
  atomically.
* A non-finite loss or gradient never reaches the parameters; ``nonfinite_policy="stop"``
  ends the run naming the step and the term, with the last checkpoint (saved only after its
  step was checked) intact; ``"skip"`` drops the update and counts it in ``skipped_updates``.
* A second run on the same workdir is refused by :class:`~stm_jax.workdir.WorkdirLock`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax import data, files, objective
from stm_jax.trainer import checkpointing, metrics, steps
from stm_jax.trainer.workdir import WorkdirError, WorkdirLock, prepare_workdir

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "train_summary.json"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


def validate_config(config) -> None:
    """Reject bad settings before anything is read or written."""
    objective.validate(config.objective)
    for key in ("num_steps", "batch_size", "checkpoint_every", "log_every", "eval_every",
                "keep_checkpoints"):
        if config[key] <= 0:
            raise ValueError(f"{key}={config[key]} must be a positive integer")
    devices, microbatches = jax.device_count(), config.get("microbatches", 1)
    if config.batch_size % devices:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the {devices} "
                         f"devices; use a multiple of {devices}")
    rows = config.batch_size // devices
    if microbatches < 1 or rows % microbatches:
        raise ValueError(f"microbatches={microbatches} must divide the {rows} rows of "
                         f"batch_size={config.batch_size} on each of {devices} device(s); use a "
                         f"divisor of {rows}")
    if config.get("peak_flops", 0.0) < 0:
        raise ValueError(f"peak_flops={config.peak_flops} must be >= 0 (0: measure or look up "
                         "the device's peak)")
    if config.nonfinite_policy not in ("stop", "skip"):
        raise ValueError(f"nonfinite_policy={config.nonfinite_policy!r}; expected 'stop' or 'skip'")


def make_mesh() -> jax.sharding.Mesh:
    """One ``data`` axis over every device; XLA propagates the shardings (Auto axis type)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of a global batch, assembled into one sharded array."""
    per_process = batch.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    return jax.make_array_from_process_local_data(sharding, batch[start:start + per_process])


def checkpoint_metadata(config, vocab: data.Vocab) -> dict:
    """What a checkpoint must agree on to be resumed: model shape and vocabulary."""
    return {"model": config.model.to_dict(), "vocab": "".join(vocab.chars),
            "vocab_unknown": vocab.unknown}


def _check_workdir_path(workdir: Path) -> None:
    """Refuse a workdir that cannot become a directory, without creating anything.

    ``prepare_workdir`` makes the same checks (and a real write) once the data has passed its
    checks; this only moves the common mistakes in front of the data loading.
    """
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists but is not a directory; pass a directory.")
    ancestor = workdir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not workdir.exists() and not ancestor.is_dir():
        raise WorkdirError(f"cannot create workdir {workdir}: {ancestor} is not a directory; "
                           "pass a path whose parent folders are directories.")


def _check_saved_config(workdir: Path, config) -> None:
    """A workdir belongs to one model: refuse to train a different shape into it."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path} is unreadable ({error}); restore it, or use a fresh "
                            "--workdir") from None
    saved_model = {k: v for k, v in saved.get("model", {}).items() if k != "vocab_size"}
    wanted = {k: v for k, v in config.model.to_dict().items() if k != "vocab_size"}
    if saved_model != wanted:
        diff = sorted(k for k in set(saved_model) | set(wanted)
                      if saved_model.get(k) != wanted.get(k))
        details = ", ".join(f"model.{k}: {saved_model.get(k)} -> {wanted.get(k)}" for k in diff)
        raise TrainingError(f"{path} was written for a different model ({details}); use a "
                            "fresh --workdir or the original config")


def _check_splits(splits: dict, config, source: str) -> None:
    """Each split holds a training window; validation holds one full evaluation batch."""
    try:
        for name in ("train", "validation"):
            data.check_split_length(splits[name], config.model.context, name)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    try:
        data.num_eval_batches(len(splits["validation"]), batch_size=config.batch_size,
                              context=config.model.context)
    except ValueError as error:
        raise ValueError(
            f"{source}: the validation split is too short for one evaluation batch of "
            f"batch_size x model.context tokens ({error.args[0].split(';')[0]}); use a longer "
            "text, a larger data.val_fraction, or a smaller batch_size or model.context"
        ) from None


def _check_vocab_unchanged(workdir: Path, vocab: data.Vocab) -> None:
    """Another run may have written vocab.json between the data checks and taking the lock."""
    path = workdir / data.VOCAB_FILENAME
    if path.exists() and data.Vocab.load(path) != vocab:
        raise TrainingError(f"{path} changed while this run was starting (another run wrote a "
                            "different vocabulary); use a fresh --workdir")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_json(path: Path, payload: dict) -> None:
    files.write_text(path, json.dumps(payload, indent=2, sort_keys=True))


class _StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks at every step boundary.

    The first signal also restores the default action of both signals, so a second one ends
    the process at once (exit by signal, nothing saved) even while the main thread is blocked
    saving a checkpoint. A signal is only seen when control returns to Python, e.g. after the
    running XLA computation. Outside the main thread (where Python cannot install handlers)
    this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # os.write, not print: a handler may run in the middle of another print.
        os.write(2, f"{self.signal_name} received: stopping after the current step to save a "
                    "checkpoint; send it again to exit at once without saving\n".encode())

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _nonfinite_message(step: int, host_metrics: dict) -> str:
    host_metrics = metrics.without_skipped_barrier(host_metrics)
    terms = {name: host_metrics[name] for name in ("ce", "barrier", "prior")
             if name in host_metrics}
    bad = [name for name, value in terms.items() if not np.isfinite(value)]
    values = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
    what = (f"non-finite {' and '.join(bad)}" if bad
            else "non-finite gradients (all loss terms finite)")
    return f"step {step}: {what} ({values}); the update was not applied"


def evaluate_split(eval_step, params, tokens, config, sharding, max_batches) -> dict:
    """Mean of every objective term over fixed validation windows."""
    totals, count = {}, 0
    for inputs, targets in data.eval_batches(tokens, batch_size=config.batch_size,
                                             context=config.model.context,
                                             max_batches=max_batches):
        aux = jax.device_get(eval_step(params, shard_batch(inputs, sharding),
                                       shard_batch(targets, sharding)))
        for name, value in aux.items():
            if np.ndim(value) == 0:
                totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: value / count for name, value in totals.items()}


def _log(config, message: str) -> None:
    if config.get("progress", True) and jax.process_index() == 0:
        print(message, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns summary.

    ``summary["status"]`` is ``"finished"`` or ``"preempted"`` (SIGTERM/SIGINT: the step
    reached is saved; call again to resume). Bad settings, data, workdirs and checkpoints
    raise ``ValueError``, :class:`TrainingError` or
    :class:`~stm_jax.checkpointing.CheckpointError` before anything is written.
    """
    validate_config(config)
    workdir = Path(workdir).expanduser()
    _check_workdir_path(workdir)
    _check_saved_config(workdir, config)
    # Read-only: an existing vocab.json is checked against the data; a new one is written below,
    # once every check has passed.
    reuse_vocab = (workdir / data.VOCAB_FILENAME).exists()
    splits, vocab, info = data.load_dataset(config.data, workdir if reuse_vocab else None)
    _check_splits(splits, config, str(info.get("source", info.get("name"))))
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    config.model.vocab_size = vocab.size

    workdir = prepare_workdir(workdir)  # the first write: creates the folder if missing
    with WorkdirLock(workdir):
        _check_saved_config(workdir, config)  # again, now that no other run can write it
        _check_vocab_unchanged(workdir, vocab)
        return _train(config, workdir, splits, vocab, info)


def _train(config, workdir: Path, splits, vocab, info) -> dict:
    mesh = make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    state = jax.device_put(state, replicated)
    metadata = checkpoint_metadata(config, vocab)
    num_devices = jax.device_count()

    with _StopRequest() as stop, checkpointing.Checkpointer(
            workdir / CHECKPOINT_DIR, max_to_keep=config.keep_checkpoints,
            save_interval_steps=config.checkpoint_every) as ckpt:
        # Restore (and so check) the latest checkpoint before this run writes anything.
        start_step = ckpt.latest_step() or 0
        if start_step:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
            state, _ = ckpt.restore(start_step, abstract, expected_metadata=metadata)
        if not (workdir / data.VOCAB_FILENAME).exists():
            vocab.save(workdir / data.VOCAB_FILENAME)
        _write_json(workdir / CONFIG_FILE, config.to_dict())

        _log(config, f"data: {info.get('source', info.get('name'))} | vocab {vocab.size} | "
             f"train {len(splits['train']):,} chars | validation {len(splits['validation']):,}")
        _log(config, f"devices: {num_devices} x {jax.devices()[0].device_kind} | global batch "
             f"{config.batch_size} = {config.batch_size // num_devices} per device x "
             f"{num_devices}")
        if start_step:
            _log(config, f"resumed from {ckpt.step_path(start_step)}")
        if start_step >= config.num_steps:
            _log(config, f"already trained to step {start_step} >= num_steps={config.num_steps}")
        with metrics.MetricsWriter(workdir) as writer:
            return _loop(config, workdir, splits, vocab, state=state, graphdef=graphdef,
                         tx=tx, ckpt=ckpt, writer=writer, stop=stop, start_step=start_step,
                         metadata=metadata, shardings=(replicated, batch_sharding))


def _loop(config, workdir, splits, vocab, *, state, graphdef, tx, ckpt, writer, stop,
          start_step, metadata, shardings) -> dict:
    """Compile, train from ``start_step`` until ``num_steps`` or a stop request, evaluate."""
    replicated, batch_sharding = shardings
    schedule = steps.barrier_schedule(config, config.num_steps)
    eval_step = jax.jit(steps.make_eval_step(graphdef, config.objective),
                        in_shardings=(replicated, batch_sharding, batch_sharding),
                        out_shardings=replicated)

    def batch_at(step):
        inputs, targets = data.get_batch(splits["train"], seed=config.seed, step=step,
                                         batch_size=config.batch_size,
                                         context=config.model.context)
        return shard_batch(inputs, batch_sharding), shard_batch(targets, batch_sharding)

    compile_start = time.perf_counter()
    # One program, or with the lazy barrier two (with it, without it), each run on its steps.
    programs = {drawn: jax.jit(
        steps.make_train_step(graphdef, config, tx, barrier_selected=drawn),
        in_shardings=(replicated, batch_sharding, batch_sharding),
        out_shardings=(replicated, replicated), donate_argnums=0,
    ).lower(state, *batch_at(start_step)).compile() for drawn in steps.barrier_draws(config)}
    step_for = lambda step: programs[None if schedule is None else bool(schedule[step])]  # noqa: E731
    if schedule is not None:
        _log(config, f"lazy barrier: {schedule.mean():.1%} of the {config.num_steps} steps "
             f"evaluate it (objective.barrier_step_fraction="
             f"{config.objective.barrier_step_fraction})")
    compile_s = time.perf_counter() - compile_start
    flops_per_token = metrics.transformer_flops_per_token(
        config.model.num_layers, config.model.d_model, config.model.num_heads,
        config.model.context, vocab.size, config.model.mlp_ratio, config.model.tie_embeddings)
    peak, peak_source = metrics.peak_flops(given=config.get("peak_flops", 0.0))
    _log(config, f"compiled the train step in {compile_s:.1f}s | peak {peak / 1e9:.0f} "
         f"GFLOP/s ({peak_source})")
    writer.write(start_step, {"compile_s": compile_s, "peak_flops": peak}, prefix="setup")

    tokens_per_step = config.batch_size * config.model.context
    run_start = time.perf_counter()
    clock = {"start": run_start, "steps": 0, "last": {}}

    def finish(done_step, step_metrics):
        """Host side of a finished step: non-finite policy, then the progress line."""
        host = _after_step(config, done_step, step_metrics, writer, ckpt)
        clock["steps"] += 1
        if done_step % config.log_every and done_step != config.num_steps:
            return
        elapsed = time.perf_counter() - clock["start"]
        tokens_per_s = clock["steps"] * tokens_per_step / elapsed
        mfu = tokens_per_s * flops_per_token / peak
        host.update(tokens_per_s=tokens_per_s, mfu=mfu, learning_rate=steps.learning_rate(
            config.optimizer, config.num_steps, done_step - 1))
        writer.write(done_step, host)
        _log(config, metrics.format_progress(done_step, config.num_steps, host, tokens_per_s,
                                             mfu, time.perf_counter() - run_start,
                                             start_step=start_step))
        clock.update(start=time.perf_counter(), steps=0, last=host)

    pending, step = None, start_step
    while step < config.num_steps and not stop.signal_name:
        state, step_metrics = step_for(step)(state, *batch_at(step))
        step += 1
        if pending is not None:  # pull the previous step's metrics while this one runs
            finish(*pending)
        pending = (step, step_metrics)
        evaluate_now = step % config.eval_every == 0 and step < config.num_steps
        if step % config.checkpoint_every == 0 or evaluate_now:
            # The non-finite policy sees a step before it is saved: a checkpoint never holds
            # a skipped update when the policy is "stop".
            finish(*pending)
            pending = None
        if evaluate_now:
            _evaluate_and_log(config, eval_step, state, splits, batch_sharding, writer, step)
        ckpt.save(step, state, metadata=metadata)  # writes every checkpoint_every-th step
    if pending is not None:
        finish(*pending)

    if step < config.num_steps:  # stopped by a signal
        if step > start_step:
            ckpt.save(step, state, metadata=metadata, force=True)
            ckpt.wait()
            where = f"saved step {step} to {ckpt.step_path(step)}"
        else:
            where = "stopped before the first step, nothing new to save"
        again = f"resume from step {step}" if step else "start"
        if jax.process_index() == 0:
            print(f"{stop.signal_name}: {where}. Run the same command again to {again}.",
                  file=sys.stderr, flush=True)
        return {"status": "preempted", "step": step, "signal": stop.signal_name}

    final = _evaluate_and_log(config, eval_step, state, splits, batch_sharding, writer, step)
    ckpt.save(step, state, metadata=metadata, force=True)
    ckpt.wait()
    wall_s = time.perf_counter() - run_start
    summary = {"status": "finished", "step": step, "wall_s": wall_s, "compile_s": compile_s,
               "tokens_per_s": clock["last"].get("tokens_per_s"),
               "skipped_updates": int(jax.device_get(state["skipped"])),
               **{f"val_{k}": v for k, v in final.items()}}
    _write_json(workdir / SUMMARY_FILE, {k: _finite_or_none(v) for k, v in summary.items()})
    _log(config, f"done: step {step} | val loss {final.get('ce', float('nan')):.4f} nats | "
         f"val bpc {final.get('bpc', float('nan')):.4f} | {metrics.format_duration(wall_s)}")
    return summary


def _after_step(config, step, step_metrics, writer, ckpt) -> dict:
    """Host side of one finished step: fetch its metrics and enforce the non-finite policy."""
    host = {k: v for k, v in jax.device_get(step_metrics).items()}
    if not bool(host.pop("finite")):
        message = _nonfinite_message(step, host)
        writer.write(step, {"nonfinite": 1.0, **_scalars(host)}, prefix="alert")
        if config.nonfinite_policy == "stop":
            latest = ckpt.latest_step()
            raise TrainingError(f"{message}. Training stopped; the last good checkpoint is "
                                f"{ckpt.step_path(latest) if latest else 'none (no save yet)'}. "
                                "Lower the learning rate or set nonfinite_policy='skip'.")
        print(f"warning: {message}; skipped (nonfinite_policy='skip')", file=sys.stderr)
    return _scalars(host)


def _scalars(host: dict) -> dict:
    out = {}
    for name, value in host.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = value.item()
        elif value.size <= 16:
            out.update({f"{name}_{i}": v.item() for i, v in enumerate(value.ravel())})
    return out


def _evaluate_and_log(config, eval_step, state, splits, sharding, writer, step,
                      max_batches=None) -> dict:
    """Validation metrics of ``state``; ``max_batches`` <= 0 or None means the whole split."""
    max_batches = config.eval_batches if max_batches is None else max_batches
    result = evaluate_split(eval_step, state["params"], splits["validation"], config, sharding,
                            max_batches if max_batches > 0 else None)
    writer.write(step, result, prefix="validation")
    _log(config, f"step {step} | validation loss {result['ce']:.4f} | bpc {result['bpc']:.4f}")
    return result
