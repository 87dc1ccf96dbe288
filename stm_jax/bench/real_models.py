"""Benchmarks of the real-model path (``scripts/benchmark_real_models.py``): encoding a text into
a token file, and sampling with the key-value cache against recomputing the context.

* Encoding: ``corpus.encode_to_file`` end to end on a cold cache (the pass that hashes the file
  and checks it is UTF-8, the split point, the encoding, the file write), in MB of UTF-8 text
  per second of wall time and per CPU-second of the process (which other jobs on the same
  cores do not change); and the BPE training that precedes it in a run's first start.
* Sampling: a random GPT-2-shaped checkpoint (written and read through ``pretrained``), one
  prompt token, ``num_tokens`` new tokens. Cached: ``sampling.Sampler`` (prefill once, then
  one token's work per layer). Recomputed: the forward pass over the context window for every
  token, as the sampler did before the cache: one compiled program on the window padded to the
  context, so its cost per token does not depend on the position, and it is timed over
  ``recompute_tokens`` tokens and scaled to ``num_tokens``. Recomputed, prefix only: the
  forward pass over exactly the tokens so far, timed at a few lengths and interpolated (what a
  sampler that recompiles for every length would pay, compilation aside). Compilation is
  excluded from all three.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stm_jax import model as model_lib
from stm_jax import pretrained
from stm_jax.data import corpus
from stm_jax.data.tokenizer import BPETokenizer
from stm_jax.evaluation import sampling


def encoding(text_path: Path, *, repeat: int, vocab_size: int, log=print) -> dict:
    """MB/s of ``encode_to_file`` on ``repeat`` copies of the text (a cold cache)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        text = Path(text_path).read_text(encoding="utf-8")
        big = folder / "corpus.txt"
        big.write_text(text * repeat, encoding="utf-8")
        start = time.perf_counter()
        tokenizer = BPETokenizer.train(corpus.chunks(corpus.TextSource.of_text(text, "train")),
                                       vocab_size)
        train_s = time.perf_counter() - start
        num_bytes = big.stat().st_size
        log(f"encoding {num_bytes / 1e6:.1f} MB with a {tokenizer.size}-token BPE ...")
        start, cpu_start = time.perf_counter(), time.process_time()
        sources = corpus.text_file_sources(big, 0.1)
        ids = [corpus.encode_to_file(source, tokenizer, folder / "cache")
               for source in sources.values()]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    num_tokens = sum(len(part) for part in ids)
    return {"text_mb": num_bytes / 1e6, "vocab": tokenizer.size, "tokens": num_tokens,
            "bytes_per_token": num_bytes / num_tokens, "seconds": seconds,
            "mb_per_s": num_bytes / 1e6 / seconds, "cpu_seconds": cpu_seconds,
            "mb_per_cpu_s": num_bytes / 1e6 / cpu_seconds, "bpe_training_s": train_s,
            "bpe_training_mb": len(text.encode()) / 1e6}


def random_gpt2(folder: Path, *, num_layers: int, d_model: int, num_heads: int, context: int,
                vocab_size: int, seed: int = 0) -> Path:
    """A randomly initialised GPT-2-shaped model exported as a Hugging Face directory."""
    cfg = pretrained.model_config({"n_layer": num_layers, "n_embd": d_model,
                                   "n_head": num_heads, "n_positions": context,
                                   "vocab_size": vocab_size})
    pretrained.export_gpt2(model_lib.init_model(cfg, seed), folder)
    return folder


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def sampling_speed(checkpoint: Path, *, num_tokens: int, recompute_tokens: int,
                   log=print) -> dict:
    model = pretrained.load_gpt2(checkpoint)
    vocab, context = model.token_embed.num_embeddings, model.context
    tokens = np.random.default_rng(0).integers(0, vocab, num_tokens + 1)

    def cached(count):
        sampler = sampling.Sampler(model)
        logits = sampler.start(tokens[:1])
        for token in tokens[1:count + 1]:
            logits = sampler.push(token)
        return logits

    cached(2)  # compile prefill and decode
    cached_s = _timed(lambda: cached(num_tokens))
    log(f"cached: {num_tokens} tokens in {cached_s:.1f}s")

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, window, length: nnx.merge(graphdef, state)(
        window[None])[0][0, length - 1])

    def recomputed(count):
        logits = None
        for index in range(1, count + 1):
            window = np.zeros(context, np.int32)
            window[:index] = tokens[:index]
            logits = forward(state, jnp.asarray(window), index)
            jax.block_until_ready(logits)
        return logits

    recomputed(1)  # compile
    recompute_s = _timed(lambda: recomputed(recompute_tokens))
    per_token = recompute_s / recompute_tokens
    log(f"recomputed: {recompute_tokens} tokens in {recompute_s:.1f}s")
    prefix_s, lengths = prefix_recompute(graphdef, state, tokens, num_tokens, log)
    return {"layers": len(model.blocks), "d_model": model.token_embed.features,
            "context": context, "vocab": vocab, "tokens": num_tokens,
            "cached_s": cached_s, "cached_tokens_per_s": num_tokens / cached_s,
            "recompute_measured_tokens": recompute_tokens, "recompute_s_per_token": per_token,
            "recompute_s": per_token * num_tokens,
            "speedup": per_token * num_tokens / cached_s,
            "prefix_recompute_s": prefix_s, "prefix_lengths": lengths,
            "prefix_speedup": prefix_s / cached_s}


def prefix_recompute(graphdef, state, tokens, num_tokens: int, log, points: int = 5):
    """A recomputing sampler that runs only the tokens so far (no padding): its total over
    ``num_tokens`` tokens, from the step times at ``points`` prefix lengths (each compiled
    once, timed once), interpolated over every length 1..num_tokens."""
    forward = jax.jit(lambda state, window: nnx.merge(graphdef, state)(window[None])[0][0, -1])
    lengths = np.linspace(1, num_tokens, points).round().astype(int).tolist()
    times = []
    for length in lengths:
        window = jnp.asarray(tokens[:length])
        jax.block_until_ready(forward(state, window))  # compile
        times.append(_timed(lambda window=window: forward(state, window)))
    total = float(np.interp(np.arange(1, num_tokens + 1), lengths, times).sum())
    log(f"recomputing the prefix only: about {total:.0f}s (step times {times} at {lengths})")
    return total, lengths


def format_report(result: dict) -> str:
    enc, smp = result["encoding"], result["sampling"]
    lines = [
        "# Real-model benchmarks", "", result["machine"], "", f"Command: `{result['command']}`",
        "", "| measurement | value | target |", "|---|---|---|",
        f"| encoding {enc['text_mb']:.1f} MB into a token file ({enc['vocab']}-token BPE, "
        f"{enc['bytes_per_token']:.2f} bytes/token) | {enc['mb_per_s']:.3f} MB/s "
        f"({enc['seconds']:.1f} s; {enc['mb_per_cpu_s']:.2f} MB per CPU-second, all threads) "
        "| >= 1 MB/s |",
        f"| BPE training on {enc['bpe_training_mb']:.1f} MB | {enc['bpe_training_s']:.1f} s | |",
        f"| sampling {smp['tokens']} tokens, {smp['layers']} layers, d = {smp['d_model']}, "
        f"context {smp['context']}, vocabulary {smp['vocab']}: KV cache | "
        f"{smp['cached_s']:.1f} s ({smp['cached_tokens_per_s']:.1f} tokens/s) | |",
        f"| the same, recomputing the context window per token | "
        f"{smp['recompute_s']:.0f} s ({smp['recompute_s_per_token']:.2f} s/token over "
        f"{smp['recompute_measured_tokens']} tokens, x {smp['tokens']}) | |",
        f"| the same, recomputing only the tokens so far (no padding; step times at "
        f"{len(smp['prefix_lengths'])} lengths, interpolated) | {smp['prefix_recompute_s']:.0f} s"
        " | |",
        f"| KV-cache speed-up over the context window / over the prefix only | "
        f"{smp['speedup']:.0f}x / {smp['prefix_speedup']:.1f}x | >= 5x |", "",
    ]
    return "\n".join(lines)
