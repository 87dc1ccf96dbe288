"""Pure training and evaluation steps over pytrees, the state they update, and their programs.

The train state is a plain dict ``{"params", "opt_state", "step", "skipped"}`` so that Orbax
saves it as it is and ``jax.jit`` places it by a matching tree of ``NamedSharding``
(``sharding.state_specs``). The model is rebuilt
inside the step from its graph definition (``nnx.merge``), so the steps stay pure functions.

Each training step carries its barrier weight (``barrier_weights``): 1 on every step, or with
the lazy barrier 1/q on a random fraction q of the steps and 0 on the others. One program is
compiled per distinct weight (``compile_train_steps``, used by the trainer and the benchmark
alike); a weight-0 program has no Jacobian work in it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax import model as model_lib
from stm_jax import objective
from stm_jax.errors import UserError
from stm_jax.trainer import accumulation


def validate_config(opt_cfg) -> None:
    """Raise :class:`UserError` for an ``optimizer`` config that cannot train."""
    if not opt_cfg.learning_rate > 0 or opt_cfg.min_learning_rate < 0:
        raise UserError(f"optimizer.learning_rate={opt_cfg.learning_rate} must be positive and "
                        f"optimizer.min_learning_rate={opt_cfg.min_learning_rate} >= 0")
    if opt_cfg.warmup_steps < 0:
        raise UserError(f"optimizer.warmup_steps={opt_cfg.warmup_steps} must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= opt_cfg[key] < 1:
            raise UserError(f"optimizer.{key}={opt_cfg[key]} must be in [0, 1)")
    if opt_cfg.weight_decay < 0 or not opt_cfg.grad_clip > 0:
        raise UserError(f"optimizer.weight_decay={opt_cfg.weight_decay} must be >= 0 and "
                        f"optimizer.grad_clip={opt_cfg.grad_clip} positive")


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to ``min_learning_rate`` at ``decay_steps``.

    ``optimizer.decay_steps`` <= 0 (the default) decays over the whole run, ``num_steps``; set
    it explicitly (nanoGPT's lr_decay_iters) to stop a run early on the same schedule.
    """
    horizon = num_steps if opt_cfg.decay_steps <= 0 else opt_cfg.decay_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
        decay_steps=max(horizon, opt_cfg.warmup_steps + 1), end_value=opt_cfg.min_learning_rate)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
    """AdamW (nanoGPT's recipe) with gradient clipping and the schedule above.

    Weight decay applies to matrices only (ndim >= 2), not to norms, biases or noise scales;
    with ``optimizer.decay_embeddings`` False, not to the token and position tables either.
    """
    schedule = learning_rate_schedule(opt_cfg, num_steps)
    embeddings = ("token_embed", "position_embed")

    def decay_mask(params):
        def decayed(path, leaf):
            top = getattr(path[0], "key", None)
            return leaf.ndim >= 2 and (opt_cfg.decay_embeddings or top not in embeddings)

        return jax.tree_util.tree_map_with_path(decayed, params)

    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(schedule, b1=opt_cfg.beta1, b2=opt_cfg.beta2,
                    weight_decay=opt_cfg.weight_decay, mask=decay_mask),
    )


def learning_rate(opt_cfg, num_steps: int, step: int) -> float:
    """The schedule's value at ``step``, for logging."""
    return float(learning_rate_schedule(opt_cfg, num_steps)(step))


def init_state(config, tx: optax.GradientTransformation):
    """(graphdef, state) for a fresh run: parameters from ``config.seed``, step 0."""
    model = model_lib.init_model(config.model, config.seed,
                                 objective.prior_width(config.objective, config.model))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),  # non-finite updates skipped so far
    }
    return graphdef, state


def start_from(state: dict, params: dict, tx: optax.GradientTransformation) -> dict:
    """A fresh ``state`` whose parameters are ``params`` (a pretrained model's, in the same
    tree) and whose optimizer state is new."""
    params = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), params, state["params"])
    return {**state, "params": params, "opt_state": tx.init(params)}


def abstract_state(config, tx: optax.GradientTransformation):
    """(graphdef, the shapes and dtypes of ``init_state``'s state), computing nothing."""
    graphdefs = []

    def state_only():
        graphdef, state = init_state(config, tx)
        graphdefs.append(graphdef)
        return state

    shapes = jax.eval_shape(state_only)
    return graphdefs[0], shapes


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step_key(seed: int, step) -> jax.Array:
    """The random key of training step ``step`` (dropout, barrier positions and step draws):
    a function of the step alone, so a resumed run replays exactly."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def barrier_weights(config) -> np.ndarray:
    """The barrier weight of each of the ``config.num_steps`` training steps, (num_steps,).

    1 on every step, unless ``objective.barrier_step_fraction`` q < 1 with a barrier (lazy
    regularisation): then each step evaluates the barrier with probability q, drawn from its
    step key so a resumed run draws the same, weighted 1/q (unbiased), and the others carry 0.
    """
    weights = step_weights(config)
    if len(weights) == 1:
        return np.full(config.num_steps, weights[0], np.float32)
    step_fraction = config.objective.barrier_step_fraction
    draw = lambda step: objective.barrier_step_selected(  # noqa: E731
        step_key(config.seed, step), step_fraction)
    selected = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(config.num_steps)))
    return np.where(selected, weights[1], weights[0]).astype(np.float32)


def make_train_step(graphdef, config, tx: optax.GradientTransformation, *,
                    barrier_weight: float = 1.0, compute_sharding=None):
    """``train_step(state, inputs, targets) -> (state, metrics)`` for steps of one barrier
    weight (``barrier_weights``); jit it with shardings (``compile_train_steps``).

    With ``config.microbatches`` = k > 1 the batch is processed as k sequential microbatches
    and their gradients averaged (``accumulation.py``): the same gradient in less memory.

    A non-finite loss or gradient never reaches the parameters: the update is skipped and
    counted, and ``metrics["finite"]`` tells the host, which stops or carries on according to
    ``config.nonfinite_policy``.

    ``compute_sharding`` (a tree of shardings like the parameters'): where the forward and
    backward pass want the parameters, e.g. gathered over the FSDP axis
    (``sharding.compute_specs``); the gradients come back to where the parameters are kept.
    """
    objective_cfg = config.objective
    microbatches = config.microbatches

    def train_step(state, inputs, targets):
        def loss_fn(params, inputs, targets, dropout_key):
            if compute_sharding is not None:
                params = jax.lax.with_sharding_constraint(params, compute_sharding)
            model = nnx.merge(graphdef, params)
            return objective.map_objective(model, inputs, targets, objective_cfg,
                                           dropout_key=dropout_key,
                                           barrier_weight=barrier_weight,
                                           batch_tokens=inputs.size * microbatches)

        (loss, aux), grads = accumulation.accumulate(
            jax.value_and_grad(loss_fn, has_aux=True), state["params"], inputs, targets,
            step_key(config.seed, state["step"]), microbatches,
            objective.combine_microbatch_aux)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep_new = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {
            "params": jax.tree.map(keep_new, params, state["params"]),
            "opt_state": jax.tree.map(keep_new, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {**aux, "grad_norm": optax.global_norm(grads), "finite": finite,
                   "skipped_updates": new_state["skipped"]}
        return new_state, metrics

    return train_step


def step_weights(config) -> tuple[float, ...]:
    """The barrier weights a config's steps can carry: (1,), or (0, 1/q) for the lazy barrier."""
    step_fraction = config.objective.barrier_step_fraction
    if config.objective.lambda_m == 0 or step_fraction >= 1:
        return (1.0,)
    return (0.0, float(np.float32(1 / step_fraction)))


def compile_train_steps(graphdef, config, tx: optax.GradientTransformation, state, inputs,
                        targets, *, state_sharding=None, batch_sharding=None,
                        compute_sharding=None) -> dict:
    """``{barrier weight: compiled train step}`` for every weight of ``step_weights``.

    With shardings the programs take the state as ``state_sharding`` (one ``NamedSharding``
    or a tree of them) places it and the batch as ``batch_sharding`` does, return the metrics
    replicated, and donate the state's buffers; without, they run where their inputs are.
    ``state``, ``inputs`` and ``targets`` fix the shapes (arrays or ``jax.ShapeDtypeStruct``).
    ``compute_sharding``: as ``make_train_step``'s.
    """
    weights = step_weights(config)
    shardings = {}
    if state_sharding is not None:
        replicated = NamedSharding(batch_sharding.mesh, P())
        shardings = dict(in_shardings=(state_sharding, batch_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=0)
    return {weight: jax.jit(make_train_step(graphdef, config, tx, barrier_weight=weight,
                                            compute_sharding=compute_sharding),
                            **shardings).lower(state, inputs, targets).compile()
            for weight in weights}


def make_eval_step(graphdef, objective_cfg, *, compute_sharding=None):
    """``eval_step(params, inputs, targets) -> metrics`` without dropout (the MAP terms too);
    ``compute_sharding`` as ``make_train_step``'s."""

    def eval_step(params, inputs, targets):
        if compute_sharding is not None:
            params = jax.lax.with_sharding_constraint(params, compute_sharding)
        model = nnx.merge(graphdef, params)
        _, aux = objective.map_objective(model, inputs, targets, objective_cfg)
        return aux

    return eval_step
