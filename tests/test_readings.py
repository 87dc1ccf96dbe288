"""The paper's readings as switches of one objective: each trains, and each does what it says.

A small model on a fixed batch: the embedding prior (its gradient routing, its positions),
every penalty, the model's own barrier on raw embeddings, training noise (training batches
only), a fixed noise scale, the embedding initialisation and its weight decay.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import objective_cfg
from flax import nnx

from configs import common
from stm_jax import model as model_lib
from stm_jax import objective
from stm_jax.core import attention, barrier
from stm_jax.model import Record
from stm_jax.trainer import steps

READINGS = {
    "prior_log_barrier": dict(barrier_target="embedding_prior", prior_dim=4),
    "prior_abs_log_capped_full_width": dict(barrier_target="embedding_prior",
                                            penalty="abs_log_capped"),
    "prior_margin_hinge_estimator": dict(barrier_target="embedding_prior", prior_dim=4,
                                         penalty="margin_hinge", margin_tau=1.5,
                                         barrier_fraction=0.5),
    "abs_log_capped": dict(penalty="abs_log_capped"),
    "margin_hinge": dict(penalty="margin_hinge", margin_tau=1.5, barrier_fraction=0.25),
    "small_gain_layer": dict(penalty="small_gain", scope="layer", small_gain_knee=0.01),
    "logdet_squared_lazy": dict(penalty="logdet_squared", barrier_step_fraction=0.5),
    "relative_train_noise": dict(train_noise_sigma=0.5),
    "fixed_noise_scale_map": dict(lambda_s=0.01, fixed_noise_scale=0.5),
    "prior_fixed_noise_scale_map": dict(barrier_target="embedding_prior", prior_dim=4,
                                        lambda_s=0.01, fixed_noise_scale=0.5),
}


def small_config(**objective_overrides):
    config = common.base_config("margin")
    config.num_steps, config.batch_size = 8, 4
    config.model.update(vocab_size=11, num_layers=2, num_heads=2, d_model=8, context=8)
    config.objective.update(objective_overrides)
    return config


def batch(seed=0):
    return np.random.default_rng(seed).integers(0, 11, (4, 8)).astype(np.int32)


@pytest.mark.parametrize("name", READINGS)
def test_each_reading_trains_with_a_finite_falling_loss(name):
    config = small_config(**READINGS[name])
    config.model.num_layers = 1  # one block: half the compilation
    objective.validate_config(config.objective)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = steps.init_state(config, tx)
    programs = steps.compile_train_steps(graphdef, config, tx, state, batch(), batch(1))
    losses, barriers = [], []
    for step, weight in enumerate(steps.barrier_weights(config)):
        state, metrics = programs[float(weight)](state, batch(), batch(1))
        assert bool(metrics["finite"]), (name, step)
        losses.append(float(metrics["ce"]))
        barriers += [float(metrics["barrier"])] if "barrier" in metrics else []
    assert losses[-1] < losses[0], losses
    assert barriers and np.all(np.isfinite(barriers))


def prior_model(seed=0, width=4):
    cfg = small_config().model
    return model_lib.init_model(cfg, seed, prior_width=width)


def test_the_prior_is_trained_by_its_own_terms_and_feeds_the_embeddings():
    """The language model never reads the prior: its weights get no gradient from the
    cross-entropy; the prior's terms reach its weights and the embedding table."""
    graphdef, state = nnx.split(prior_model())
    inputs = jnp.asarray(batch())
    ce_only = objective_cfg("ce", barrier_target="embedding_prior", prior_dim=4)
    barrier_only = objective_cfg("margin", barrier_target="embedding_prior", prior_dim=4)

    def grads(cfg, part):
        def loss(state):
            value, aux = objective.map_objective(nnx.merge(graphdef, state), inputs, inputs,
                                                 cfg)
            return aux["barrier"] if part == "barrier" else value
        return nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))

    from_ce = grads(ce_only, "loss")
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(from_ce["prior"]))
    from_prior = grads(barrier_only, "barrier")
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(
        {k: v for k, v in from_prior["prior"].items() if k != "log_noise_scale"}))
    assert np.any(np.asarray(from_prior["token_embed"]["embedding"]) != 0)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(from_prior["blocks"]))


def test_the_prior_penalty_averages_over_positions_two_on():
    """J_1 = I (no past): the exact penalty is the mean over t >= 2, and the estimator draws
    its positions there."""
    model = prior_model(width=4)
    inputs = jnp.asarray(batch())
    cfg = objective_cfg("margin", barrier_target="embedding_prior", prior_dim=4)
    aux = nnx.jit(lambda m, x: objective.map_objective(m, x, x, cfg)[1])(model, inputs)
    stats = model.prior(model.embed(inputs), positions=jnp.arange(1, 8))
    expected = jnp.mean(barrier.smooth_log_barrier(stats["sign"], stats["logdet"],
                                                   cfg.barrier_eps))
    np.testing.assert_allclose(aux["barrier"], expected, rtol=1e-4, atol=1e-7)
    positions = objective.barrier_positions(4, 8, 0.5, jax.random.PRNGKey(0), first=1)
    assert positions.shape == (4, 4) and int(positions.min()) >= 1 and int(positions.max()) <= 7


def test_first_layer_norm_off_puts_the_barrier_on_the_raw_embeddings():
    cfg = small_config().model
    cfg.first_layer_norm = False
    model = model_lib.init_model(cfg, 0)
    inputs = jnp.asarray(batch())
    _, stats = model(inputs, record=Record(scope="layer", layers="embedding"))
    x0 = model.embed(inputs)
    params = model.blocks[0].attention_params()
    oracle = jax.vmap(lambda u: attention.causal_self_attention(params, u, scope="layer")[1])(x0)
    np.testing.assert_allclose(stats["logdet"][0], oracle.logdet, rtol=1e-5, atol=1e-6)
    # The second block still reads LN(x): only the first changes.
    assert model.blocks[0].norm_input is False and model.blocks[1].norm_input is True


def test_training_noise_changes_training_steps_only():
    model = model_lib.init_model(small_config().model, 0)
    inputs, key = jnp.asarray(batch()), jax.random.PRNGKey(5)
    losses = {}
    for name, cfg in (("clean", objective_cfg("ce")),
                      ("noisy", objective_cfg("ce", train_noise_sigma=0.5))):
        train = nnx.jit(lambda m, k, cfg=cfg: objective.map_objective(
            m, inputs, inputs, cfg, dropout_key=k)[0])
        evaluate = nnx.jit(lambda m, cfg=cfg: objective.map_objective(m, inputs, inputs, cfg)[0])
        losses[name] = (float(train(model, key)), float(evaluate(model)))
    assert losses["noisy"][0] != losses["clean"][0]  # a training step sees the noise
    assert losses["noisy"][1] == losses["clean"][1]  # evaluation never does


def test_relative_noise_scale_is_constant_for_the_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)))
    noise = jnp.ones_like(x)
    grad = jax.grad(lambda x: jnp.sum(model_lib.add_embedding_noise(x, noise, 0.5, True)))(x)
    np.testing.assert_allclose(grad, np.ones_like(x))  # no path through the RMS


def test_embedding_init_and_weight_decay_switches():
    cfg = small_config()
    cfg.model.update(embed_init_std=1.0, vocab_size=500)
    model = model_lib.init_model(cfg.model, 0)
    assert 0.9 < float(jnp.std(model.token_embed.embedding[...])) < 1.1
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay in (True, False):
        cfg.optimizer.decay_embeddings = decay
        tx = steps.make_optimizer(cfg.optimizer, cfg.num_steps)
        opt_state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(10):  # past the warm-up's zero learning rate
            updates, opt_state = update(zeros, opt_state, params)
        new = optax.apply_updates(params, updates)
        moved = lambda path, new=new: not np.array_equal(path(new), path(params))  # noqa: E731
        assert moved(lambda p: p["token_embed"]["embedding"]) == decay
        assert moved(lambda p: p["position_embed"]) == decay
        assert moved(lambda p: p["blocks"][0]["wq"])  # matrices decay either way
