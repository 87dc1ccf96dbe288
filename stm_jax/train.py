"""``train_and_evaluate(config, workdir)``: the training loop behind ``scripts/train.py``.

Data parallel over every local device with ``jax.jit`` on a ``('data',)`` mesh: parameters
and optimizer state replicated, batches sharded on their first axis. Orbax checkpoints every
``checkpoint_every`` steps and at the end; a rerun with the same workdir resumes from the
latest complete checkpoint and, since batches and dropout are functions of (seed, step),
finishes with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax import checkpointing, data, metrics, objective, steps
from stm_jax.workdir import WorkdirLock, prepare_workdir

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


def validate_config(config) -> None:
    """Reject bad settings before anything is read or written."""
    objective.validate(config.objective)
    for key in ("num_steps", "batch_size", "checkpoint_every", "log_every", "eval_every"):
        if config[key] <= 0:
            raise ValueError(f"{key}={config[key]} must be a positive integer")
    devices = jax.device_count()
    if config.batch_size % devices:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the {devices} "
                         f"devices; use a multiple of {devices}")
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


def _check_saved_config(workdir: Path, config) -> None:
    """A workdir belongs to one model: refuse to train a different shape into it."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    saved_model = {k: v for k, v in saved.get("model", {}).items() if k != "vocab_size"}
    wanted = {k: v for k, v in config.model.to_dict().items() if k != "vocab_size"}
    if saved_model != wanted:
        diff = sorted(k for k in set(saved_model) | set(wanted)
                      if saved_model.get(k) != wanted.get(k))
        details = ", ".join(f"model.{k}: {saved_model.get(k)} -> {wanted.get(k)}" for k in diff)
        raise TrainingError(f"{path} was written for a different model ({details}); use a "
                            "fresh --workdir or the original config")


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at a step boundary and exits."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _nonfinite_message(step: int, host_metrics: dict) -> str:
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
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns summary."""
    validate_config(config)
    workdir = prepare_workdir(workdir)
    with WorkdirLock(workdir):
        _check_saved_config(workdir, config)
        splits, vocab, info = data.load_dataset(config.data, workdir)
        for name in ("train", "validation"):
            data.check_split_length(splits[name], config.model.context, name)
        config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
        config.model.vocab_size = vocab.size
        _write_json_atomic(workdir / CONFIG_FILE, config.to_dict())
        return _train(config, workdir, splits, vocab, info)


def _train(config, workdir: Path, splits, vocab, info) -> dict:
    mesh = make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    state = jax.device_put(state, replicated)
    metadata = checkpoint_metadata(config, vocab)
    num_devices = jax.device_count()
    _log(config, f"data: {info.get('source', info.get('name'))} | vocab {vocab.size} | "
         f"train {len(splits['train']):,} chars | validation {len(splits['validation']):,}")
    _log(config, f"devices: {num_devices} x {jax.devices()[0].device_kind} | global batch "
         f"{config.batch_size} = {config.batch_size // num_devices} per device x {num_devices}")

    with checkpointing.Checkpointer(workdir / CHECKPOINT_DIR,
                                    max_to_keep=config.keep_checkpoints,
                                    save_interval_steps=config.checkpoint_every) as ckpt, \
            metrics.MetricsWriter(workdir) as writer, _StopRequest() as stop:
        start_step = ckpt.latest_step() or 0
        if start_step:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
            state, _ = ckpt.restore(start_step, abstract, expected_metadata=metadata)
            _log(config, f"resumed from {ckpt.step_path(start_step)}")
        if start_step >= config.num_steps:
            _log(config, f"already trained to step {start_step} >= num_steps={config.num_steps}")

        train_step = jax.jit(steps.make_train_step(graphdef, config, tx),
                             in_shardings=(replicated, batch_sharding, batch_sharding),
                             out_shardings=(replicated, replicated), donate_argnums=0)
        eval_step = jax.jit(steps.make_eval_step(graphdef, config.objective),
                            in_shardings=(replicated, batch_sharding, batch_sharding),
                            out_shardings=replicated)

        def batch_at(step):
            inputs, targets = data.get_batch(splits["train"], seed=config.seed, step=step,
                                             batch_size=config.batch_size,
                                             context=config.model.context)
            return shard_batch(inputs, batch_sharding), shard_batch(targets, batch_sharding)

        compile_start = time.perf_counter()
        compiled = train_step.lower(state, *batch_at(start_step)).compile()
        compile_s = time.perf_counter() - compile_start
        flops_per_token = metrics.transformer_flops_per_token(
            config.model.num_layers, config.model.d_model, config.model.num_heads,
            config.model.context, vocab.size, config.model.mlp_ratio, config.model.tie_embeddings)
        peak, peak_source = metrics.peak_flops()
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

        pending, stopped_by, step = None, None, start_step
        while step < config.num_steps:
            state, step_metrics = compiled(state, *batch_at(step))
            step += 1
            if pending is not None:  # pull the previous step's metrics while this one runs
                finish(*pending)
            pending = (step, step_metrics)
            if step % config.eval_every == 0 and step < config.num_steps:
                _evaluate_and_log(config, eval_step, state, splits, batch_sharding, writer, step)
            ckpt.save(step, state, metadata=metadata)
            if stop.signal_name:
                stopped_by = stop.signal_name
                break
        if pending is not None:
            finish(*pending)
        last_logged = clock["last"]

        if stopped_by:
            ckpt.save(step, state, metadata=metadata, force=True)
            ckpt.wait()
            _log(config, f"{stopped_by}: saved step {step} to {ckpt.step_path(step)}; run the "
                 "same command again to resume")
            return {"status": "preempted", "step": step, "signal": stopped_by}
        final = _evaluate_and_log(config, eval_step, state, splits, batch_sharding, writer, step,
                                  max_batches=None if config.eval_batches <= 0 else
                                  config.eval_batches)
        ckpt.save(step, state, metadata=metadata, force=True)
        wall_s = time.perf_counter() - run_start
        summary = {"status": "finished", "step": step, "wall_s": wall_s, "compile_s": compile_s,
                   "tokens_per_s": last_logged.get("tokens_per_s"),
                   "skipped_updates": int(jax.device_get(state["skipped"])),
                   **{f"val_{k}": v for k, v in final.items()}}
        _write_json_atomic(workdir / "train_summary.json", summary)
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
                      max_batches=-1) -> dict:
    max_batches = config.eval_batches if max_batches == -1 else max_batches
    result = evaluate_split(eval_step, state["params"], splits["validation"], config, sharding,
                            max_batches)
    writer.write(step, result, prefix="validation")
    _log(config, f"step {step} | validation loss {result['ce']:.4f} | bpc {result['bpc']:.4f}")
    return result
