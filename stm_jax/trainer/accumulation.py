"""Gradient accumulation: one step's batch as ``k`` sequential microbatches of equal size.

Every term of the objective is a mean over the batch's tokens (the prior's hyperprior is
divided by the whole batch's token count, ``batch_tokens``), so the mean of the microbatches'
losses and gradients is the whole batch's, up to float rounding. Only the random draws
differ: microbatch j uses ``fold_in(key, j)`` for dropout and the barrier's positions.

Why: activations of 1/k of the batch are live at a time. That bounds memory and, on a small
CPU, can be faster (a smaller working set; ``benchmarks/cpu_small`` times both).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def split_rows(batch: jax.Array, microbatches: int) -> jax.Array:
    """(B, ...) -> (k, B / k, ...), microbatch j holding rows j, j + k, j + 2k, ...

    Interleaved rather than contiguous so that a batch sharded in contiguous blocks over
    devices (B / k divisible by their number) stays sharded the same way in every microbatch.
    """
    rows = batch.shape[0]
    if rows % microbatches:
        raise ValueError(f"a batch of {rows} rows does not split into {microbatches} "
                         "microbatches of equal size")
    return jnp.swapaxes(batch.reshape(rows // microbatches, microbatches, *batch.shape[1:]),
                        0, 1)


def accumulate(value_and_grad: Callable, params, inputs: jax.Array, targets: jax.Array,
               key: jax.Array | None, microbatches: int, combine_aux: Callable):
    """``((loss, aux), grads)`` of the whole batch from ``value_and_grad(params, inputs,
    targets, key) -> ((loss, aux), grads)`` on each microbatch in turn (``lax.scan``).

    Loss and gradients are the microbatches' means; ``combine_aux`` merges the auxiliary
    metrics stacked on a leading microbatch axis (a count adds up, a minimum stays a minimum).
    """
    if microbatches == 1:
        return value_and_grad(params, inputs, targets, key)
    keys = (None if key is None else
            jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(microbatches)))

    def one_microbatch(grad_sum, slices):
        inputs_j, targets_j, key_j = slices
        (loss, aux), grads = value_and_grad(params, inputs_j, targets_j, key_j)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (losses, aux) = jax.lax.scan(
        one_microbatch, zeros,
        (split_rows(inputs, microbatches), split_rows(targets, microbatches), keys))
    grads = jax.tree.map(lambda g: g / microbatches, grad_sum)
    return (jnp.mean(losses), combine_aux(aux)), grads
