"""The GPT and the MAP objective: oracles (optax, finite differences), causality, projectivity."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from conftest import objective_cfg
from flax import nnx

from configs import common
from stm_jax import model as model_lib
from stm_jax import objective
from stm_jax.core import attention, barrier
from stm_jax.errors import UserError
from stm_jax.model import Record


def small_model(seed=0, **overrides):
    cfg = common.base_config().model
    cfg.update(vocab_size=11, num_layers=2, num_heads=2, d_model=8, context=7, dropout=0.0,
               tie_embeddings=True, use_bias=True, mlp_ratio=2, dtype="float32")
    cfg.update(overrides)
    return model_lib.init_model(cfg, seed)


def tokens(seed=0, batch=3, length=7):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 11)


def jitted_objective(cfg, **kwargs):
    """map_objective under nnx.jit: run eagerly, dispatching every small op took 10-20 s a test.

    ``cfg`` is read when the function is traced: make a new one after changing it.
    """
    return nnx.jit(lambda model, inputs, targets: objective.map_objective(
        model, inputs, targets, cfg, **kwargs))


def float64_model(seed):
    """A small model whose parameters and compute dtype are float64 (inside the x64 fixture)."""
    graphdef, state = nnx.split(small_model(seed, dtype="float64"))
    return graphdef, jax.tree.map(lambda x: x.astype(jnp.float64), state)


def test_ce_only_equals_optax_cross_entropy():
    model, inputs, targets = small_model(), tokens(0), tokens(1)
    loss, aux = jitted_objective(objective_cfg("ce"))(model, inputs, targets)
    logits, _ = nnx.jit(lambda m, x: m(x))(model, inputs)
    expected = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux["bpc"], expected / np.log(2), rtol=1e-6)
    assert set(aux) == {"loss", "ce", "bpc", "embedding_rms"}
    x0 = np.asarray(nnx.jit(lambda m, x: m.embed(x))(model, inputs))
    np.testing.assert_allclose(aux["embedding_rms"], np.sqrt(np.mean(x0**2)), rtol=1e-6)


def test_margin_term_is_the_mean_smooth_barrier_of_per_head_log_dets(x64):
    graphdef, state = float64_model(2)
    model = nnx.merge(graphdef, state)
    inputs, targets = tokens(2), tokens(3)
    cfg = objective_cfg("margin", barrier_eps=0.05)
    loss, aux = jitted_objective(cfg)(model, inputs, targets)

    @nnx.jit
    def head_stats_by_hand(model, inputs):
        """Each layer's attention input rebuilt by hand, then the pure function."""
        x, head_stats = model.embed(inputs), []
        for block in model.blocks:
            u = block.ln_attn(x)
            head_stats.append(jax.vmap(lambda s, b=block: attention.causal_self_attention(
                b.attention_params(), s, scope="head")[1])(u))
            x, _ = block(x, record=Record(), dtype=jnp.float64, key=None)
        return head_stats

    head_stats = head_stats_by_hand(model, inputs)
    per_token = [barrier.smooth_log_barrier(s.head_sign, s.head_logdet, 0.05).sum(axis=1)
                 for s in head_stats]
    np.testing.assert_allclose(aux["barrier"], np.mean(per_token), rtol=1e-10)
    np.testing.assert_allclose(loss, aux["ce"] + 0.02 * aux["barrier"], rtol=1e-12)
    # A floor clips each head's barrier before the sum over heads.
    per_head = [barrier.smooth_log_barrier(s.head_sign, s.head_logdet, 0.05) for s in head_stats]
    for floor in (0.0, float(np.median(np.concatenate([np.ravel(b) for b in per_head])))):
        cfg.barrier_floor = floor
        floored = jitted_objective(cfg)(model, inputs, targets)[1]["barrier"]
        expected = np.mean([np.maximum(b, floor).sum(axis=1) for b in per_head])
        np.testing.assert_allclose(floored, expected, rtol=1e-10)


@pytest.mark.parametrize("variant,scope,layers", [
    ("margin", "head", "all"), ("margin", "layer", "embedding"), ("map", "layer", "all")])
def test_objective_gradients_match_finite_differences(x64, variant, scope, layers):
    graphdef, state = float64_model(1)
    inputs, targets = tokens(4, batch=2, length=5), tokens(5, batch=2, length=5)
    cfg = objective_cfg(variant, scope=scope, layers=layers, lambda_m=0.5,
                                     lambda_s=0.3 if variant == "map" else 0.0)
    loss_fn = lambda s: objective.map_objective(  # noqa: E731
        nnx.merge(graphdef, s), inputs, targets, cfg)[0]
    jax.test_util.check_grads(jax.jit(loss_fn), (state,), order=1, modes=["rev"], eps=1e-6,
                              atol=1e-5, rtol=1e-5)


def test_every_term_is_reported_and_adds_up():
    model, inputs = small_model(), tokens(0)
    cfg = objective_cfg("map")
    loss, aux = jitted_objective(cfg)(model, inputs, inputs)
    expected = aux["ce"] + cfg.lambda_m * aux["barrier"] + cfg.lambda_s * aux["prior"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for key in ("infeasible_tokens", "infeasible_fraction", "logdet_min", "noise_scale"):
        assert key in aux


def test_jit_equals_eager_and_vmap_equals_loop():
    model, inputs, targets = small_model(), tokens(0), tokens(1)
    cfg = objective_cfg("map")
    graphdef, state = nnx.split(model)
    loss_fn = lambda s, x, y: objective.map_objective(nnx.merge(graphdef, s), x, y, cfg)  # noqa
    eager, _ = loss_fn(state, inputs, targets)
    jitted, _ = jax.jit(loss_fn)(state, inputs, targets)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    one = lambda x, y: loss_fn(state, x[None], y[None])[0]  # noqa: E731
    mapped = jax.vmap(one)(inputs, targets)
    looped = [jax.jit(one)(x, y) for x, y in zip(inputs, targets, strict=True)]
    np.testing.assert_allclose(mapped, looped, rtol=1e-5)


def test_variants_and_validation():
    assert objective_cfg("ce").lambda_m == 0
    assert objective_cfg("margin").lambda_m == 0.02
    full = objective_cfg("map")
    assert full.lambda_m > 0 and full.lambda_s > 0
    with pytest.raises(UserError, match="lambda_m=-0.1 is negative"):
        objective.validate_config(objective_cfg("margin", lambda_m=-0.1))
    with pytest.raises(ValueError, match="unknown objective variant"):
        objective_cfg("svm")
    with pytest.raises(UserError, match="barrier_step_fraction=0.0 must be in"):
        objective.validate_config(objective_cfg("margin", barrier_step_fraction=0))


def test_logits_are_causal_by_gradients():
    model = small_model()
    x0 = model.embed(tokens(0, batch=1))
    jac = jax.jacrev(lambda x: model.from_embeddings(x)[0][0].sum(-1))(x0)[:, 0]  # (T, T, d)
    for t in range(x0.shape[1]):
        assert np.all(jac[t, t + 1:] == 0)


def test_projectivity_of_logits_and_layer_statistics():
    model, seq = small_model(), tokens(6, batch=2)
    forward = nnx.jit(lambda m, s: m(s, record=Record(scope="both", residuals=True,
                                                      margins=True)))
    logits_full, stats_full = forward(model, seq)
    for n in (1, 3, 6):
        logits, stats = forward(model, seq[:, :n])
        np.testing.assert_allclose(logits, logits_full[:, :n], atol=1e-5)
        for name, value in stats.items():
            np.testing.assert_allclose(value, stats_full[name][..., :n], atol=1e-4, err_msg=name)


def test_embedding_layer_set_and_dropout_determinism():
    model, seq = small_model(dropout=0.5), tokens(0)
    _, stats = model(seq, record=Record(scope="layer", layers="embedding", residuals=True))
    assert stats["logdet"].shape == (1, 3, 7) and stats["residual_sq"].shape == (1, 3, 7)
    _, stats = model(seq, record=Record(scope="head", layers="all"))
    assert stats["head_logdet"].shape == (2, 3, 2, 7)
    key = jax.random.PRNGKey(3)
    first, second = model(seq, dropout_key=key)[0], model(seq, dropout_key=key)[0]
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, model(seq)[0])


def test_untied_head_and_bad_shapes():
    model = small_model(tie_embeddings=False)
    assert model(tokens(0))[0].shape == (3, 7, 11)
    with pytest.raises(ValueError, match="exceeds model.context"):
        model(tokens(0, length=9))
    with pytest.raises(ValueError, match="not divisible"):
        small_model(num_heads=3)


def test_barrier_estimator_is_unbiased_over_position_subsets(x64):
    """The mean over all equally likely subsets equals the exact barrier (enumerated), for one
    subset shared by the batch and for one subset per sequence; the model's statistics at the
    given positions are the exact per-token ones there, and the objective draws such a subset."""
    import itertools

    graphdef, state = float64_model(3)
    model = nnx.merge(graphdef, state)
    inputs = tokens(7, batch=2, length=5)
    cfg = objective_cfg("margin", lambda_m=1.0)
    exact = jitted_objective(cfg)(model, inputs, inputs)[1]["barrier"]
    head_stats = nnx.jit(lambda m, x, positions: m(
        x, record=Record(scope="head", positions=positions))[1])
    stats = nnx.jit(lambda m, x: m(x, record=Record(scope="head"))[1])(model, inputs)
    per_token = barrier.smooth_log_barrier(stats["head_sign"], stats["head_logdet"],
                                           cfg.barrier_eps).sum(axis=2)  # (L, B, T)
    # The model's statistics at given positions, shared (n,) or per sequence (B, n), are the
    # exact per-token ones gathered there (test_attention checks chunks with positions).
    for positions in ([1, 3], [[0, 3], [1, 4]], [[2, 4], [0, 1]]):
        sub_stats = head_stats(model, inputs, jnp.asarray(positions))
        sub = barrier.smooth_log_barrier(sub_stats["head_sign"], sub_stats["head_logdet"],
                                         cfg.barrier_eps).sum(axis=2)
        index = np.broadcast_to(np.asarray(positions), (2, 2))
        np.testing.assert_allclose(sub, np.take_along_axis(per_token, index[None], axis=2),
                                   atol=1e-12)
    # Hence the estimates of every subset, and their mean over the equally likely ones.
    subsets = list(itertools.combinations(range(5), 2))
    shared = [np.mean(per_token[..., list(subset)]) for subset in subsets]
    per_sequence = [np.mean(np.stack([per_token[:, 0, list(first)], per_token[:, 1, list(second)]]))
                    for first, second in itertools.product(subsets, repeat=2)]
    for estimates in (shared, per_sequence):
        np.testing.assert_allclose(np.mean(estimates), exact, rtol=1e-12)
    # The objective draws such subsets when training (a dropout key is given); per sequence,
    # the two sequences' subsets differ on some of eight keys (all alike: 1e-8).
    cfg.barrier_fraction = 0.4
    pairs = list(itertools.product(subsets, repeat=2))
    for sampling, estimates in (("shared", shared), ("per_sequence", per_sequence)):
        cfg.barrier_sampling = sampling
        drawn = nnx.jit(lambda m, x, key: objective.map_objective(  # noqa: B023 (traced now)
            m, x, x, cfg, dropout_key=key)[1]["barrier"])
        matches = [[i for i, e in enumerate(estimates) if np.isclose(drawn(
            model, inputs, jax.random.PRNGKey(key)), e, rtol=1e-12)] for key in range(8)]
        assert all(matches), sampling
        if sampling == "per_sequence":
            assert any(pairs[i][0] != pairs[i][1] for found in matches for i in found)


def test_per_sequence_positions_are_independent_uniform_subsets():
    batch, length, count = 4000, 8, 2
    positions = np.asarray(objective.barrier_positions(batch, length, count / length,
                                                       jax.random.PRNGKey(0)))
    assert positions.shape == (batch, count)
    assert np.all(np.diff(positions, axis=1) > 0)  # sorted, without repeats
    pairs = {tuple(row) for row in positions}
    assert len(pairs) == 28  # every one of the C(8, 2) subsets is drawn
    # Each position is in a subset with probability n/T = 1/4: 4 sigma ~ 0.027.
    inclusion = np.bincount(positions.ravel(), minlength=length) / batch
    np.testing.assert_allclose(inclusion, count / length, atol=0.03)
    shared = objective.barrier_positions(batch, length, 0.25, jax.random.PRNGKey(0), "shared")
    assert shared.shape == (count,)
    with pytest.raises(UserError, match="barrier_sampling"):
        objective.validate_config(objective_cfg("margin", barrier_sampling="rows"))


def test_lazy_barrier_gradient_is_unbiased_over_the_step_draw(x64):
    """q x (gradient of a step of weight 1/q) + (1 - q) x (one of weight 0) equals the exact
    gradient; a step of weight 0 reports no barrier at all (nothing to filter)."""
    graphdef, state = float64_model(5)
    inputs, targets = tokens(2, batch=2, length=6), tokens(3, batch=2, length=6)
    q = 0.25
    cfg = objective_cfg("map", lambda_m=0.5, lambda_s=0.1, barrier_step_fraction=q)
    key = jax.random.PRNGKey(0)

    def grads(weight):
        loss_fn = lambda params: objective.map_objective(  # noqa: E731
            nnx.merge(graphdef, params), inputs, targets, cfg, dropout_key=key,
            barrier_weight=weight)
        return jax.jit(jax.grad(loss_fn, has_aux=True))(state)

    (on, aux_on), (off, aux_off), (exact, aux_exact) = grads(1 / q), grads(0.0), grads(1.0)
    np.testing.assert_allclose(aux_on["barrier"], aux_exact["barrier"], rtol=1e-12)
    assert aux_on["barrier_weight"] == 1 / q and aux_off["barrier_weight"] == 0
    assert "barrier" not in aux_off and "infeasible_tokens" not in aux_off
    assert aux_exact["barrier_weight"] == 1
    np.testing.assert_allclose(aux_off["loss"], aux_exact["ce"] + 0.1 * aux_exact["prior"],
                               rtol=1e-12)
    # float32 tolerance: nnx.Embed looks tokens up in float32 even in this float64 model.
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(q * a + (1 - q) * b, c, rtol=1e-6,
                                                            atol=1e-7), on, off, exact)


def test_lazy_barrier_weights_draw_the_fraction_and_replay():
    from configs import tiny
    from stm_jax.trainer import steps

    config = tiny.get_config("margin")
    config.objective.barrier_step_fraction = 0.25
    config.num_steps = 4000
    weights = steps.barrier_weights(config)
    assert set(np.unique(weights)) == {0.0, 4.0}
    assert abs(np.mean(weights > 0) - 0.25) < 0.03  # 4 sigma ~ 0.027
    config.num_steps = 100
    np.testing.assert_array_equal(steps.barrier_weights(config), weights[:100])
    config.seed += 1
    assert not np.array_equal(steps.barrier_weights(config), weights[:100])
    config.objective.barrier_step_fraction = 1.0
    np.testing.assert_array_equal(steps.barrier_weights(config), np.ones(100))
