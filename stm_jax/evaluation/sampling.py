"""``sample(model, vocab, prompt, num_chars=...)``: text continued by a trained model.

The model only ever saw windows of ``model.context`` tokens starting at position 0, so the
step function reads a fixed-size window holding the last ``context`` tokens, left-aligned
(positions 0..n-1, as in training) and padded on the right. Causal attention makes the logits at
position n-1 independent of the padding, so one compiled step serves every prompt length and
every step of the loop. Randomness is ``fold_in(PRNGKey(seed), i)`` for the i-th character: the
same seed gives the same text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stm_jax import data
from stm_jax.errors import UserError
from stm_jax.model import GPT


def encode_prompt(vocab: data.Vocab, prompt: str) -> np.ndarray:
    """Token ids of ``prompt``; characters the model never saw are an error naming them.

    Even a vocabulary with an unknown symbol refuses them: the unknown id never occurs in the
    train split, so its embedding is untrained and conditioning on it means nothing.
    """
    if not prompt:
        raise UserError("the prompt is empty; give at least one character to continue from")
    missing = sorted(set(prompt) - set(vocab.chars), key=prompt.index)
    if missing:
        listed = ", ".join(repr(c) for c in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise UserError(f"the prompt has characters not in the model's vocabulary: {listed}"
                         f"{more}; the model knows {len(vocab.chars)} characters")
    return vocab.encode(prompt)


@functools.lru_cache(maxsize=8)
def _step_fn(graphdef, top_k: int | None, greedy: bool, unknown_id: int | None):
    """The jitted next-token draw for one model structure and sampling rule (compiled once)."""

    def step(state, window, length, key, temperature):
        model = nnx.merge(graphdef, state)
        logits, _ = model(window[None])  # (1, context, V)
        logits = logits[0, length - 1]
        if unknown_id is not None:  # never emit the placeholder for unseen characters
            logits = logits.at[unknown_id].set(-jnp.inf)
        if greedy:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k is not None:
            kth_largest = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    return jax.jit(step)


def _check_options(vocab: data.Vocab, num_chars: int, temperature: float, top_k: int | None):
    if num_chars < 0:
        raise UserError(f"num_chars={num_chars} must be >= 0")
    if not temperature >= 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 picks the likeliest char)")
    if top_k is not None and not 1 <= top_k <= len(vocab.chars):
        raise UserError(f"top_k={top_k} must be between 1 and the {len(vocab.chars)} "
                         "characters of the vocabulary (or None for no limit)")


def sample(
    model: GPT,
    vocab: data.Vocab,
    prompt: str,
    *,
    num_chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """``num_chars`` characters continuing ``prompt`` (the prompt itself is not included).

    ``temperature`` divides the logits (0 means greedy); ``top_k`` keeps only the k likeliest
    characters. Only the last ``model.context`` characters of the text so far are seen.
    """
    _check_options(vocab, num_chars, temperature, top_k)
    tokens = list(encode_prompt(vocab, prompt))
    graphdef, state = nnx.split(model)
    step = _step_fn(graphdef, top_k, temperature == 0, vocab.unknown_id)
    context, base_key = model.context, jax.random.PRNGKey(seed)
    generated = []
    for index in range(num_chars):
        visible = tokens[-context:]
        window = np.zeros(context, np.int32)
        window[:len(visible)] = visible
        token = int(step(state, window, len(visible), jax.random.fold_in(base_key, index),
                         max(temperature, 1e-6)))
        tokens.append(token)
        generated.append(token)
    return vocab.decode(np.asarray(generated, np.int32))
