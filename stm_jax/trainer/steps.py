"""Pure training and evaluation steps over pytrees, and the state they update.

The train state is a plain dict ``{"params", "opt_state", "step", "skipped"}`` so that Orbax
saves it as it is and ``jax.jit`` shards it with one ``NamedSharding``. The model is rebuilt
inside the step from its graph definition (``nnx.merge``), so the steps stay pure functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stm_jax import model as model_lib
from stm_jax import objective
from stm_jax.trainer import accumulation


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to ``min_learning_rate`` at ``decay_steps``.

    ``optimizer.decay_steps`` <= 0 (the default) decays over the whole run, ``num_steps``; set
    it explicitly (nanoGPT's lr_decay_iters) to stop a run early on the same schedule.
    """
    horizon = opt_cfg.get("decay_steps", -1)
    horizon = num_steps if horizon <= 0 else horizon
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
        decay_steps=max(horizon, opt_cfg.warmup_steps + 1), end_value=opt_cfg.min_learning_rate)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
    """AdamW (nanoGPT's recipe) with gradient clipping and the schedule above.

    Weight decay applies to matrices only (ndim >= 2), not to norms, biases or noise scales.
    """
    schedule = learning_rate_schedule(opt_cfg, num_steps)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
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
    model = model_lib.init_model(config.model, config.seed)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),  # non-finite updates skipped so far
    }
    return graphdef, state


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step_key(seed: int, step) -> jax.Array:
    """The random key of training step ``step`` (dropout, barrier positions and step draws):
    a function of the step alone, so a resumed run replays exactly."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def lazy_barrier(config) -> bool:
    """Whether the barrier is evaluated on a random fraction of steps only."""
    return config.objective.lambda_m > 0 and config.objective.get(
        "barrier_step_fraction", 1.0) < 1.0


def barrier_draws(config) -> tuple[bool | None, ...]:
    """The ``barrier_selected`` value of each train-step program to compile: (True, False)
    for the lazy barrier (a step with it and one without), else (None,)."""
    return (True, False) if lazy_barrier(config) else (None,)


def barrier_schedule(config, num_steps: int) -> np.ndarray | None:
    """Which of steps 0 .. num_steps - 1 evaluate the barrier when
    ``objective.barrier_step_fraction`` < 1 (each drawn from its step's key, so a resumed run
    draws the same), or None when every step does."""
    if not lazy_barrier(config):
        return None
    fraction = config.objective.barrier_step_fraction
    draw = lambda step: objective.barrier_step_selected(  # noqa: E731
        step_key(config.seed, step), fraction)
    return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(num_steps)))


def make_train_step(graphdef, config, tx: optax.GradientTransformation, *,
                    barrier_selected: bool | None = None):
    """``train_step(state, inputs, targets) -> (state, metrics)``; jit it with shardings.

    With the lazy barrier (``barrier_schedule`` not None) build one step with
    ``barrier_selected=True`` and one with False, and run each on its scheduled steps.

    With ``config.microbatches`` = k > 1 the batch is processed as k sequential microbatches
    and their gradients averaged (``accumulation.py``): the same gradient in less memory.

    A non-finite loss or gradient never reaches the parameters: the update is skipped and
    counted, and ``metrics["finite"]`` tells the host, which stops or carries on according to
    ``config.nonfinite_policy``.
    """
    objective_cfg = config.objective
    microbatches = config.get("microbatches", 1)

    def train_step(state, inputs, targets):
        def loss_fn(params, inputs, targets, dropout_key):
            model = nnx.merge(graphdef, params)
            return objective.map_objective(model, inputs, targets, objective_cfg,
                                           dropout_key=dropout_key,
                                           barrier_selected=barrier_selected,
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


def make_eval_step(graphdef, objective_cfg):
    """``eval_step(params, inputs, targets) -> metrics`` without dropout (the MAP terms too)."""

    def eval_step(params, inputs, targets):
        model = nnx.merge(graphdef, params)
        _, aux = objective.map_objective(model, inputs, targets, objective_cfg)
        return aux

    return eval_step
