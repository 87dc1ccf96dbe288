"""``sample(model, tokenizer, prompt, num_tokens=...)``: text continued by a model, with a
key-value cache.

The prompt's last ``model.context`` tokens are run through the model once (``prefill``: the
model's own forward pass on a window of 16, 32, 64, ... tokens, left-aligned at position 0 as
in training and padded on the right, which causal attention ignores), keeping every layer's
keys and values.
Each new token then costs one token's work per layer (``decode``:
``core.attention.decode_attention`` against the cache), not a forward pass over the context;
its logits are those of the forward pass over the same tokens. When the window is full, the
last half of it is run through ``prefill`` again, so the model always sees at least
``context / 2`` tokens and the position embeddings never run out. Both steps are compiled once
per model and window size. Randomness is ``fold_in(PRNGKey(seed), i)`` for the i-th token: the
same seed gives the same text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stm_jax import data
from stm_jax.core import attention
from stm_jax.errors import UserError
from stm_jax.model import GPT, Record


def encode_prompt(tokenizer: data.Vocab | data.BPETokenizer, prompt: str) -> np.ndarray:
    """Token ids of ``prompt``; characters a character model never saw are an error naming
    them (a byte-level BPE encodes any text).

    Even a vocabulary with an unknown symbol refuses them: the unknown id never occurs in the
    train split, so its embedding is untrained and conditioning on it means nothing.
    """
    if not prompt:
        raise UserError("the prompt is empty; give at least one character to continue from")
    if tokenizer.kind != "char":
        return tokenizer.encode(prompt)
    missing = sorted(set(prompt) - set(tokenizer.chars), key=prompt.index)
    if missing:
        listed = ", ".join(repr(c) for c in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise UserError(f"the prompt has characters not in the model's vocabulary: {listed}"
                         f"{more}; the model knows {len(tokenizer.chars)} characters")
    return tokenizer.encode(prompt)


# ---------------------------------------------------------------------------------------------
# The cached forward pass


def prefill(model: GPT, window: jax.Array) -> tuple[jax.Array, dict]:
    """Logits (T, V) of one window (T,) and the key-value cache {"k", "v": L x (H, C, p)},
    one array per layer of the context C (each updated in place by ``decode``)."""
    logits, stats = model(window[None], record=Record(inputs=True))
    inputs = stats["input"][:, 0]  # (L, T, d): each layer's attention input u^l
    pad = ((0, 0), (0, model.context - window.shape[0]), (0, 0))  # room for the tokens to come
    cache = {name: [jnp.pad(attention.project(block.attention_params(model.compute_dtype), u,
                                              name), pad)
                    for block, u in zip(model.blocks, inputs, strict=True)]
             for name in ("k", "v")}
    return logits[0], cache


def decode(model: GPT, cache: dict, token: jax.Array, position) -> tuple[jax.Array, dict]:
    """Logits (V,) after ``token`` at ``position``, given the cache of the positions before
    it; returns the cache with this token's keys and values added."""
    dtype = model.compute_dtype
    x = model.token_embed(token) + model.position_embed[position]  # (d,)
    keys, values = [], []
    for block, k, v in zip(model.blocks, cache["k"], cache["v"], strict=True):
        u = (block.ln_attn(x) if block.norm_input else x).astype(dtype)
        out, k, v = attention.decode_attention(block.attention_params(dtype), u, k, v,
                                               position)
        keys.append(k)
        values.append(v)
        x = x + out.astype(x.dtype)
        x = x + block.mlp(x[None], dtype)[0].astype(x.dtype)
    return model.logits(x), {"k": keys, "v": values}


@functools.lru_cache(maxsize=8)
def _programs(graphdef):
    """The jitted prefill and decode step of one model structure (compiled once each)."""

    def run_prefill(state, window):
        return prefill(nnx.merge(graphdef, state), window)

    def run_decode(state, cache, token, position):
        return decode(nnx.merge(graphdef, state), cache, token, position)

    return jax.jit(run_prefill), jax.jit(run_decode, donate_argnums=1)


@functools.lru_cache(maxsize=8)
def _draw_fn(top_k: int | None, greedy: bool, unknown_id: int | None):
    """The jitted next-token draw from one row of logits."""

    def draw(logits, key, temperature):
        if unknown_id is not None:  # never emit the placeholder for unseen characters
            logits = logits.at[unknown_id].set(-jnp.inf)
        if greedy:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k is not None:
            kth_largest = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    return jax.jit(draw)


def _check_options(tokenizer, num_tokens: int, temperature: float, top_k: int | None):
    if num_tokens < 0:
        raise UserError(f"num_tokens={num_tokens} must be >= 0")
    if not temperature >= 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 picks the likeliest token)")
    if top_k is not None and not 1 <= top_k <= tokenizer.size:
        raise UserError(f"top_k={top_k} must be between 1 and the {tokenizer.size} tokens of "
                         "the vocabulary (or None for no limit)")


class Sampler:
    """The token stream of one model: ``next_logits`` for the text so far, ``push`` a token."""

    def __init__(self, model: GPT):
        graphdef, self.state = nnx.split(model)
        self.context = model.context
        self._prefill, self._decode = _programs(graphdef)
        self.tokens: list[int] = []
        self.cache, self.length, self.logits = None, 0, None

    def start(self, tokens) -> jax.Array:
        """Prefill with the last ``context`` of ``tokens``; the next token's logits (V,)."""
        self.tokens = [int(t) for t in tokens]
        return self._refill(self.tokens[-self.context:])

    def _refill(self, visible: list[int]) -> jax.Array:
        # Windows of 16, 32, 64, ... tokens (at most the context): a short prompt does not pay
        # for a whole context, and few window sizes are compiled.
        size = min(self.context, max(16, 1 << (len(visible) - 1).bit_length()))
        window = np.zeros(size, np.int32)
        window[:len(visible)] = visible
        logits, self.cache = self._prefill(self.state, window)
        self.length = len(visible)
        self.logits = logits[self.length - 1]
        return self.logits

    def push(self, token: int) -> jax.Array:
        """Append ``token``; the logits of the token after it (V,)."""
        self.tokens.append(int(token))
        if self.length == self.context:  # full: keep the last half, recomputed
            return self._refill(self.tokens[-max(1, self.context // 2):])
        self.logits, self.cache = self._decode(self.state, self.cache, jnp.int32(token),
                                               jnp.int32(self.length))
        self.length += 1
        return self.logits


def sample(
    model: GPT,
    tokenizer: data.Vocab | data.BPETokenizer,
    prompt: str,
    *,
    num_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The text of ``num_tokens`` tokens continuing ``prompt`` (the prompt not included).

    ``temperature`` divides the logits (0 means greedy); ``top_k`` keeps only the k likeliest
    tokens. The model sees the last ``model.context`` tokens at most (module docstring).
    """
    _check_options(tokenizer, num_tokens, temperature, top_k)
    prompt_ids = encode_prompt(tokenizer, prompt)
    draw = _draw_fn(top_k, temperature == 0, tokenizer.unknown_id)
    sampler, base_key = Sampler(model), jax.random.PRNGKey(seed)
    generated = []
    logits = sampler.start(prompt_ids) if num_tokens else None
    for index in range(num_tokens):
        token = int(draw(logits, jax.random.fold_in(base_key, index), max(temperature, 1e-6)))
        generated.append(token)
        if index + 1 < num_tokens:
            logits = sampler.push(token)
    return tokenizer.decode(np.asarray(generated, np.int32))
