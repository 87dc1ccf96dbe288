"""Gradient accumulation: k microbatches give the whole batch's loss, gradient and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import objective_cfg
from flax import nnx

from stm_jax import objective
from stm_jax.trainer import accumulation, steps
from tests.test_model_objective import float64_model, tokens


def test_split_rows_interleaves_rows_and_rejects_an_uneven_split():
    batch = jnp.arange(6 * 2).reshape(6, 2)
    parts = accumulation.split_rows(batch, 3)
    assert parts.shape == (3, 2, 2)
    np.testing.assert_array_equal(parts[1], batch[jnp.array([1, 4])])  # rows j, j + k, ...
    with pytest.raises(ValueError, match="a batch of 6 rows does not split into 4 microbatches"):
        accumulation.split_rows(batch, 4)


def test_microbatches_give_the_whole_batch_loss_gradient_and_metrics(x64, microbatches=2):
    """MAP objective (barrier and prior, hyperprior included) with some infeasible tokens:
    the accumulated loss, gradient and every metric equal one pass over the whole batch."""
    graphdef, state = float64_model(7)
    # Larger attention weights put some determinants below zero, so the infeasible count (a
    # sum over microbatches) and the smallest log-det (a minimum) are both exercised.
    params = nnx.to_pure_dict(state)
    for block in params["blocks"].values():
        for name in ("wq", "wk", "wv", "wo"):
            block[name] = 40 * block[name]
    params["log_noise_scale"] = params["log_noise_scale"] + 0.3  # a non-zero hyperprior
    inputs, targets = tokens(4, batch=4, length=7), tokens(5, batch=4, length=7)
    cfg = objective_cfg("map", lambda_m=0.5, lambda_s=0.1)

    def loss_fn(params, inputs, targets, key):
        return objective.map_objective(nnx.merge(graphdef, params), inputs, targets, cfg,
                                       dropout_key=key, batch_tokens=targets.size)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = jax.jit(value_and_grad)(params, inputs, targets, None)
    batch_tokens = inputs.size

    def split_loss(params, inputs, targets, key):  # each microbatch counts the whole batch
        return objective.map_objective(nnx.merge(graphdef, params), inputs, targets, cfg,
                                       dropout_key=key, batch_tokens=batch_tokens)

    (acc_loss, acc_aux), acc_grads = jax.jit(
        lambda p: accumulation.accumulate(
            jax.value_and_grad(split_loss, has_aux=True), p, inputs, targets, None,
            microbatches, objective.combine_microbatch_aux))(params)
    assert aux["infeasible_tokens"] > 0
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-12)
    assert set(acc_aux) == set(aux)
    for name in aux:
        rtol = 1e-10 if aux[name].dtype == jnp.float64 else 1e-6  # float32 fractions
        np.testing.assert_allclose(acc_aux[name], aux[name], rtol=rtol, err_msg=name)
    # float32 tolerance: nnx.Embed looks tokens up in float32 even in this float64 model.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 acc_grads, grads)


def test_train_step_with_microbatches_logs_the_whole_batch_metrics():
    """The train step with config.microbatches = 2 and 1: the same loss, prior and gradient
    norm, so the step passes the whole batch's token count and merges the metrics. (The
    prior alone: the barrier's merging is checked above, and compiling it twice is slow.)"""
    from configs import tiny

    config = tiny.get_config("map")
    config.objective.lambda_m = 0.0
    config.batch_size = 4
    config.model.update(vocab_size=11, num_layers=1, context=8)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    # A non-zero hyperprior, which each microbatch must divide by the whole batch's tokens.
    state["params"]["log_noise_scale"] = state["params"]["log_noise_scale"] + 0.3
    inputs = tokens(6, batch=config.batch_size, length=config.model.context)
    targets = tokens(7, batch=config.batch_size, length=config.model.context)
    logged = {}
    for microbatches in (1, 2):
        config.microbatches = microbatches
        step = jax.jit(steps.make_train_step(graphdef, config, tx))
        logged[microbatches] = step(state, inputs, targets)[1]
    for name in ("loss", "ce", "prior", "residual_rms", "grad_norm"):
        np.testing.assert_allclose(logged[2][name], logged[1][name], rtol=1e-5, err_msg=name)
