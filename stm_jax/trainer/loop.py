"""``train_and_evaluate(config, workdir)``: the training path behind ``scripts/train.py``.

The state and the batch live on a ``(data, fsdp, model)`` mesh of every device
(``config.mesh``, ``sharding.py``): by default data parallel (parameters and optimizer state
replicated, batches split on their first axis); with ``fsdp`` the parameters and optimizer
state are split too, with ``model`` the heads and MLP hidden units. The step is one
``jax.jit`` program with explicit shardings, on one process or several (``multihost.py``:
process 0 locks the workdir, writes its files and prints; every process feeds its own rows of
each batch). Orbax checkpoints every ``checkpoint_every`` steps and at the end; a rerun with
the same workdir resumes from the latest complete checkpoint, on any mesh, and, since batches
and dropout are functions of (seed, step), finishes with the same parameters as an
uninterrupted run.

What a run does when something goes wrong:

* Every check comes before anything is written: the whole config (before any data is read),
  the workdir path and the config it was written with, the data (readable UTF-8, splits long
  enough for a training window and an evaluation batch, the workdir's vocabulary), and the
  latest checkpoint (metadata, tree and arrays are restored before the run writes a byte). A
  failure is one :class:`~stm_jax.errors.UserError` naming the problem and the fix, and
  leaves the workdir as it was (a fresh one is not even created).
* SIGTERM or SIGINT (preemption, Ctrl-C) stops at a step boundary that every process agrees
  on (``multihost.StopVote``), saves that step and returns ``status="preempted"``; rerunning
  the same command resumes. A second signal ends the process at once without saving.
* A killed run (``kill -9``, out of memory, power loss of the host) loses only the steps after
  its last complete checkpoint: Orbax writes each step into a temporary folder and renames it
  when complete, and ``vocab.json``, ``config.json`` and ``train_summary.json`` are replaced
  atomically.
* A non-finite loss or gradient never reaches the parameters; ``nonfinite_policy="stop"``
  ends the run naming the step and the term, with the last checkpoint (saved only after its
  step was checked) intact; ``"skip"`` drops the update and counts it in ``skipped_updates``.
* A second run on the same workdir is refused by :class:`~stm_jax.trainer.workdir.WorkdirLock`
  (taken by process 0 for the whole job; every process of a refused job stops with its error).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax import data, files, objective, pretrained
from stm_jax import model as model_lib
from stm_jax.errors import UserError
from stm_jax.trainer import checkpointing, metrics, multihost, sharding, steps
from stm_jax.trainer import workdir as workdir_lib
from stm_jax.trainer.preemption import StopRequest
from stm_jax.trainer.progress import Progress

POSITIVE_KEYS = ("num_steps", "batch_size", "checkpoint_every", "log_every", "eval_every",
                 "keep_checkpoints", "microbatches")


def validate_config(config) -> None:
    """Every section and key, before anything is read or written: one UserError line."""
    model_lib.validate_config(config.model)
    objective.validate_config(config.objective)
    steps.validate_config(config.optimizer)
    data.validate_config(config.data)
    multihost.validate_config(config.distributed)
    for key in POSITIVE_KEYS:
        if not isinstance(config[key], int) or config[key] < 1:
            raise UserError(f"{key}={config[key]!r} must be a positive integer")
    if config.eval_batches < 0:
        raise UserError(f"eval_batches={config.eval_batches} must be >= 0 (0: whole split)")
    devices = jax.device_count()
    shape = sharding.mesh_shape(config.mesh, devices)
    sharding.check_model_fits(config.model, shape)
    shards = sharding.batch_shards(shape)
    split = (f"{shards} devices" if shards == devices else
             f"{shards} batch shards (mesh.data x mesh.fsdp = {shape[0]} x {shape[1]})")
    if config.batch_size % shards:
        raise UserError(f"batch_size={config.batch_size} is not divisible by the {split}; use "
                        f"a multiple of {shards}")
    rows = config.batch_size // shards
    if rows % config.microbatches:
        each = "device(s)" if shards == devices else "batch shards"
        raise UserError(f"microbatches={config.microbatches} must divide the {rows} rows of "
                        f"batch_size={config.batch_size} on each of {shards} {each}; use a "
                        f"divisor of {rows}")
    if config.peak_flops < 0:
        raise UserError(f"peak_flops={config.peak_flops} must be >= 0 (0: measure or look up "
                        "the device's peak)")
    if config.nonfinite_policy not in ("stop", "skip"):
        raise UserError(f"nonfinite_policy={config.nonfinite_policy!r}; expected 'stop' or "
                        "'skip'")
    if config.init_from and config.data.tokenizer in ("char", "bpe"):
        raise UserError(f"init_from={config.init_from!r} needs the checkpoint's own tokenizer: "
                        "set data.tokenizer to its tokenizer.json (e.g. "
                        f"{Path(config.init_from) / pretrained.TOKENIZER_FILE}).")


def with_pretrained(config) -> tuple[ml_collections.ConfigDict, dict | None]:
    """(config, parameters): with ``init_from`` (a GPT-2 directory) the model's architecture
    keys come from its config.json, as the data fills in ``vocab_size``, and its weights are
    read and checked (a fresh run starts from them); otherwise (config, None)."""
    if not config.init_from:
        return config, None
    model_cfg, params = pretrained.read_gpt2(config.init_from, context=config.model.context)
    check_tokenizer_fits(data.BPETokenizer.load(config.data.tokenizer), config.data.tokenizer,
                         model_cfg.vocab_size, config.init_from)
    config = ml_collections.ConfigDict(config.to_dict())
    for key in pretrained.ARCHITECTURE_KEYS:
        config.model[key] = model_cfg[key]
    return config, params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns summary.

    ``summary["status"]`` is ``"finished"`` or ``"preempted"`` (SIGTERM/SIGINT: the step
    reached is saved; call again to resume). Bad settings, data, workdirs and checkpoints
    raise :class:`~stm_jax.errors.UserError` before anything is written. With several
    processes (``multihost.initialize``) every process calls it alike.
    """
    # 1. Every check that can fail, read-only.
    validate_config(config)
    config, initial_params = with_pretrained(config)
    workdir = workdir_lib.preflight(workdir, config)
    splits, vocab, info = load_splits(config, workdir)
    if initial_params is not None:  # the workdir's own tokenizer.json, on a resumed run
        check_tokenizer_fits(vocab, workdir, config.model.vocab_size, config.init_from)
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    config.model.vocab_size = vocab.size
    mesh = sharding.make_mesh(sharding.mesh_shape(config.mesh, jax.device_count()))
    batch_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, shapes = steps.abstract_state(config, tx)
    specs = sharding.state_specs(shapes, tx, mesh)
    state_sharding = sharding.named(mesh, specs)
    compute_sharding = sharding.named(mesh, sharding.compute_specs(specs["params"]))
    metadata = workdir_lib.checkpoint_metadata(config, vocab)
    primary = multihost.is_primary()

    with contextlib.ExitStack() as stack:
        # 2. The first write creates the folder; one run at a time from here on (process 0
        # holds the lock for the whole job).
        multihost.on_primary(lambda: workdir_lib.take_workdir(workdir, stack))
        workdir = workdir_lib.resolve(workdir)
        stop = stack.enter_context(StopRequest())
        ckpt = stack.enter_context(checkpointing.Checkpointer(
            workdir / workdir_lib.CHECKPOINT_DIR, max_to_keep=config.keep_checkpoints,
            save_interval_steps=config.checkpoint_every))
        workdir_lib.preflight(workdir, config)  # again, now that no other run can write it
        workdir_lib.check_vocab_unchanged(workdir, vocab)
        # 3. Restore (and so check) the latest checkpoint before this run writes a file.
        start_step = ckpt.latest_step() or 0
        if start_step:
            abstract = jax.tree.map(
                lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                shapes, state_sharding)
            state = ckpt.restore(start_step, abstract, expected_metadata=metadata,
                                 upgrade_metadata=workdir_lib.upgrade_metadata)[0]
        else:  # the same values on every process, each placing its own devices' shards
            state = steps.init_state(config, tx)[1]
            if initial_params is not None:
                state = steps.start_from(state, initial_params, tx)
            state = multihost.place(state, state_sharding)
        if primary:
            if not (workdir / vocab.filename).exists():
                vocab.save(workdir / vocab.filename)
            files.write_json(workdir / workdir_lib.CONFIG_FILE, config.to_dict(), indent=2)

        def batch_at(step):
            inputs, targets = data.get_batch(splits["train"], seed=config.seed, step=step,
                                             batch_size=config.batch_size,
                                             context=config.model.context)
            return (multihost.shard_batch(inputs, batch_sharding),
                    multihost.shard_batch(targets, batch_sharding))

        def evaluate(state) -> dict:
            return evaluate_split(eval_step, state["params"], splits["validation"], config,
                                  batch_sharding, config.eval_batches, vocab.token_bytes)

        writer = stack.enter_context(metrics.MetricsWriter(workdir) if primary
                                     else metrics.NullWriter())
        progress = Progress(config, writer, ckpt, start_step)
        progress.start(info, splits, mesh)
        # 4. One program per barrier weight (two with the lazy barrier).
        compile_start = time.perf_counter()
        weights = steps.barrier_weights(config)
        programs = steps.compile_train_steps(
            graphdef, config, tx, state, *batch_at(start_step), state_sharding=state_sharding,
            batch_sharding=batch_sharding, compute_sharding=compute_sharding)
        eval_step = jax.jit(steps.make_eval_step(graphdef, config.objective,
                                                 compute_sharding=compute_sharding),
                            in_shardings=(state_sharding["params"], batch_sharding,
                                          batch_sharding),
                            out_shardings=replicated)
        progress.compiled(time.perf_counter() - compile_start, weights)

        # 5. Train, dispatching step t + 1 before fetching step t's metrics.
        vote = multihost.StopVote(mesh)
        pending, step = None, start_step
        while step < config.num_steps and not vote.stop_now(bool(stop.signal_name)):
            state, step_metrics = programs[float(weights[step])](state, *batch_at(step))
            step += 1
            if pending is not None:
                progress.step_done(*pending)
            pending = (step, step_metrics)
            evaluate_now = step % config.eval_every == 0 and step < config.num_steps
            if step % config.checkpoint_every == 0 or evaluate_now:
                progress.step_done(*pending)  # the policy sees a step before it is saved
                pending = None
            if evaluate_now:
                progress.validation(step, evaluate(state))
            ckpt.save(step, state, metadata=metadata)  # every checkpoint_every-th step
        if pending is not None:
            progress.step_done(*pending)

        # 6. Preempted: save the step reached. Finished: evaluate, save, summarise.
        if step < config.num_steps:
            return preempted(stop.signal_name or "SIGTERM or SIGINT on another process", step,
                             start_step, state, metadata, ckpt)
        final = progress.validation(step, evaluate(state))
        ckpt.save(step, state, metadata=metadata, force=True)
        ckpt.wait()
        summary = {"status": "finished", "step": step, **progress.summary(),
                   "skipped_updates": int(jax.device_get(state["skipped"])),
                   **{f"val_{k}": v for k, v in final.items()}}
        if primary:
            files.write_json(workdir / workdir_lib.SUMMARY_FILE, summary, indent=2)
        progress.done(step, final)
        return summary


def check_tokenizer_fits(tokenizer, where, vocab_size: int, checkpoint: str) -> None:
    if tokenizer.size != vocab_size:
        raise UserError(f"the tokenizer of {where} has {tokenizer.size:,} tokens but the "
                        f"checkpoint {checkpoint} has a vocabulary of {vocab_size:,}; use the "
                        "tokenizer.json that came with the checkpoint.")


def load_splits(config, workdir: os.PathLike) -> tuple[dict, data.Vocab, dict]:
    """The token splits and vocabulary (``vocab.json`` reused if the workdir has one, never
    written here), checked to hold a training window and one evaluation batch."""
    reuse_vocab = any((workdir / name).exists()
                      for name in (data.VOCAB_FILENAME, data.TOKENIZER_FILENAME))
    splits, vocab, info = data.load_dataset(config.data, workdir if reuse_vocab else None,
                                            progress=config.progress)
    source = str(info.get("source", info.get("name")))
    try:
        for name in ("train", "validation"):
            data.check_split_length(splits[name], config.model.context, name)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    try:
        data.num_eval_batches(len(splits["validation"]), batch_size=config.batch_size,
                              context=config.model.context)
    except ValueError as error:
        raise UserError(
            f"{source}: the validation split is too short for one evaluation batch of "
            f"batch_size x model.context tokens ({error.args[0].split(';')[0]}); use a longer "
            "text, a larger data.val_fraction, or a smaller batch_size or model.context"
        ) from None
    return splits, vocab, info


def evaluate_split(eval_step, params, tokens, config, sharding, max_batches: int,
                   token_bytes: np.ndarray) -> dict:
    """Mean of every objective term over fixed validation windows (``max_batches`` <= 0: the
    whole split), and ``bpb``: the bits per UTF-8 byte of the windows' targets (every batch
    has B T targets, so its summed loss is ``ce`` B T)."""
    totals, count, num_bytes = {}, 0, 0
    for inputs, targets in data.eval_batches(tokens, batch_size=config.batch_size,
                                             context=config.model.context,
                                             max_batches=max_batches if max_batches > 0
                                             else None):
        aux = jax.device_get(eval_step(params, multihost.shard_batch(inputs, sharding),
                                       multihost.shard_batch(targets, sharding)))
        for name, value in aux.items():
            if np.ndim(value) == 0:
                totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
        num_bytes += int(token_bytes[targets].sum())
    means = {name: value / count for name, value in totals.items()}
    return {**means, "bpb": totals["ce"] * targets.size / math.log(2) / num_bytes}


def preempted(signal_name: str, step: int, start_step: int, state, metadata: dict,
              ckpt: checkpointing.Checkpointer) -> dict:
    """Saves the step a signal stopped at and says how to resume."""
    if step > start_step:
        ckpt.save(step, state, metadata=metadata, force=True)
        ckpt.wait()
        where = f"saved step {step} to {ckpt.step_path(step)}"
    else:
        where = "stopped before the first step, nothing new to save"
    again = f"resume from step {step}" if step else "start"
    if jax.process_index() == 0:
        print(f"{signal_name}: {where}. Run the same command again to {again}.",
              file=sys.stderr, flush=True)
    return {"status": "preempted", "step": step, "signal": signal_name}
