"""The host side of the training loop: each finished step's metrics, the non-finite policy,
progress lines, tokens/s and model FLOPs utilisation.

Only process 0 prints and writes (the others are given a ``metrics.NullWriter``); every
process applies the non-finite policy to the same replicated metrics, so all stop together.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from stm_jax.errors import UserError
from stm_jax.trainer import flops, metrics, steps


class Progress:
    """Bookkeeping for one training session (from ``start_step`` to the end or a stop)."""

    def __init__(self, config, writer: metrics.MetricsWriter, ckpt, start_step: int):
        self.config, self.writer, self.ckpt = config, writer, ckpt
        self.start_step = start_step
        self.tokens_per_step = config.batch_size * config.model.context
        self.flops_per_token = flops.model_flops_per_token(config.model)
        self.peak = self.compile_s = None
        self.run_start = self.window_start = time.perf_counter()
        self.window_steps, self.last = 0, {}

    def print(self, message: str) -> None:
        if self.config.progress and jax.process_index() == 0:
            print(message, flush=True)

    def start(self, info: dict, splits: dict, mesh: jax.sharding.Mesh) -> None:
        devices = jax.device_count()
        batch = self.config.batch_size
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.print(f"data: {info.get('source', info.get('name'))} | vocab "
                   f"{self.config.model.vocab_size} | train {len(splits['train']):,} tokens | "
                   f"validation {len(splits['validation']):,}")
        processes = (f" in {jax.process_count()} processes" if jax.process_count() > 1
                     else "")
        self.print(f"devices: {devices} x {jax.devices()[0].device_kind}{processes} | mesh "
                   + " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
                   + f" | global batch {batch} = {batch // shards} per batch shard x {shards}")
        if self.start_step:
            self.print(f"resumed from {self.ckpt.step_path(self.start_step)}")
        if self.start_step >= self.config.num_steps:
            self.print(f"already trained to step {self.start_step} >= "
                       f"num_steps={self.config.num_steps}")

    def compiled(self, compile_s: float, weights: np.ndarray) -> None:
        """After compiling: the peak FLOP/s for MFU, the lazy barrier's draw, the setup record."""
        self.compile_s = compile_s
        self.peak, source = flops.peak_flops(given=self.config.peak_flops)
        if len(set(weights.tolist())) > 1:
            self.print(f"lazy barrier: {np.mean(weights > 0):.1%} of the {len(weights)} steps "
                       f"evaluate it, weighted {weights.max():g} (objective."
                       f"barrier_step_fraction={self.config.objective.barrier_step_fraction})")
        self.print(f"compiled the train step in {compile_s:.1f}s | peak "
                   f"{self.peak / 1e9:.0f} GFLOP/s ({source})")
        self.writer.write(self.start_step, {"compile_s": compile_s, "peak_flops": self.peak},
                          prefix="setup")
        self.run_start = self.window_start = time.perf_counter()

    def step_done(self, step: int, step_metrics: dict) -> None:
        """A finished step: fetch its metrics, apply the non-finite policy, and every
        ``log_every`` steps write a record and print a progress line."""
        host = jax.device_get(step_metrics)
        self.check_finite(step, host)
        host = metrics.scalars(host)
        self.window_steps += 1
        config = self.config
        if step % config.log_every and step != config.num_steps:
            return
        now = time.perf_counter()
        tokens_per_s = self.window_steps * self.tokens_per_step / (now - self.window_start)
        mfu = tokens_per_s * self.flops_per_token / self.peak
        host.update(tokens_per_s=tokens_per_s, mfu=mfu, learning_rate=steps.learning_rate(
            config.optimizer, config.num_steps, step - 1))
        host = self.named(host)
        self.writer.write(step, host)
        self.print(metrics.format_progress(step, config.num_steps, host, tokens_per_s, mfu,
                                           now - self.run_start, start_step=self.start_step))
        self.window_start, self.window_steps, self.last = time.perf_counter(), 0, host

    def check_finite(self, step: int, host: dict) -> None:
        """``nonfinite_policy``: "stop" raises (the last checkpoint holds no bad update),
        "skip" warns (the step already kept its old parameters)."""
        if bool(host.pop("finite")):
            return
        message = nonfinite_message(step, host)
        self.writer.write(step, {"nonfinite": 1.0, **metrics.scalars(host)}, prefix="alert")
        if self.config.nonfinite_policy == "stop":
            latest = self.ckpt.latest_step()
            raise UserError(f"{message}. Training stopped; the last good checkpoint is "
                            f"{self.ckpt.step_path(latest) if latest else 'none (no save yet)'}"
                            ". Lower the learning rate or set nonfinite_policy='skip'.")
        if jax.process_index() == 0:
            print(f"warning: {message}; skipped (nonfinite_policy='skip')", file=sys.stderr)

    def named(self, record: dict) -> dict:
        """``bpc`` (ce / ln 2) is bits per character only in a character run; a subword run
        calls it ``bits_per_token`` (and is compared by ``bpb``)."""
        if self.config.data.tokenizer == "char" or "bpc" not in record:
            return record
        record = dict(record)
        record["bits_per_token"] = record.pop("bpc")
        return record

    def bits(self, result: dict) -> str:
        """``bpc 2.7 | bpb 2.7`` or ``bits/token 9.1 | bpb 2.5``."""
        if "bpc" in result:
            return f"bpc {result['bpc']:.4f} | bpb {result['bpb']:.4f}"
        return f"bits/token {result['bits_per_token']:.4f} | bpb {result['bpb']:.4f}"

    def validation(self, step: int, result: dict) -> dict:
        result = self.named(result)
        self.writer.write(step, result, prefix="validation")
        self.print(f"step {step} | validation loss {result['ce']:.4f} | {self.bits(result)}")
        return result

    def summary(self) -> dict:
        return {"wall_s": time.perf_counter() - self.run_start, "compile_s": self.compile_s,
                "tokens_per_s": self.last.get("tokens_per_s")}

    def done(self, step: int, final: dict) -> None:
        self.print(f"done: step {step} | val loss {final['ce']:.4f} nats | val "
                   f"{self.bits(final)} | "
                   f"{metrics.format_duration(time.perf_counter() - self.run_start)}")


def nonfinite_message(step: int, host_metrics: dict) -> str:
    terms = {name: host_metrics[name] for name in ("ce", "barrier", "prior")
             if name in host_metrics}
    bad = [name for name, value in terms.items() if not np.isfinite(value)]
    values = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
    what = (f"non-finite {' and '.join(bad)}" if bad
            else "non-finite gradients (all loss terms finite)")
    return f"step {step}: {what} ({values}); the update was not applied"
