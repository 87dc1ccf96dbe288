"""Where the train state and the batch live on a ``(data, fsdp, model)`` device mesh.

The mesh is ``config.mesh``: ``data`` x ``fsdp`` x ``model`` devices, one of them -1 for the
rest (the default, ``data=-1``, is plain data parallelism). The partition rules are pure
functions of a parameter's path and shape:

* ``model`` (tensor parallelism) splits attention heads and MLP hidden units:
  ``wq``, ``wk``, ``wv`` (d, H, p) and ``wo`` (H, p, d) on their head axis, ``fc.kernel``
  (d, 4d) and ``proj.kernel`` (4d, d) on their hidden axis. Every head's queries, keys,
  values, attention moments and Jacobian blocks are then computed on the devices holding
  that head; the heads meet only where their outputs are summed (``wo``), as the MLP's
  hidden units meet in ``proj``.
* ``fsdp`` splits one large axis of every weight (the largest one it divides that ``model``
  does not), so each device stores 1/fsdp of it; the step gathers it for the forward and
  backward pass (``compute_specs``, a sharding constraint: without it XLA resharded
  activations instead, at a cost) and reduces the gradient back onto the shards (an
  all-reduce and a slice on CPU, which accelerators turn into a reduce-scatter).
* Vectors (norms, biases, the prior's noise scales) are replicated, and so are counters.
* The optimizer state follows its parameter (``optax.tree_map_params``).
* The batch is split over ``data`` x ``fsdp`` on its first axis and replicated over
  ``model``.

Only mesh axes longer than 1 appear in a parameter's spec, so the default mesh replicates
every parameter, as data parallelism always did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stm_jax.errors import UserError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# The axis of heads or hidden units in each weight that ``model`` splits, by the last keys
# of its path in the parameter tree.
MODEL_AXIS = {("wq",): 1, ("wk",): 1, ("wv",): 1, ("wo",): 0, ("fc", "kernel"): 1,
              ("proj", "kernel"): 0}


def validate_config(mesh_cfg) -> None:
    """Raise :class:`UserError` for mesh sizes that cannot describe a mesh (the device count
    is checked by ``mesh_shape``)."""
    sizes = [mesh_cfg[axis] for axis in AXES]
    if any(not isinstance(size, int) or (size < 1 and size != -1) for size in sizes):
        raise UserError(f"mesh sizes {_describe(mesh_cfg)} must be positive integers or -1 "
                        "(the rest of the devices)")
    if sizes.count(-1) > 1:
        raise UserError(f"mesh sizes {_describe(mesh_cfg)} have more than one -1; give at "
                        "most one axis as -1 (the rest of the devices)")


def _describe(mesh_cfg) -> str:
    return ", ".join(f"mesh.{axis}={mesh_cfg[axis]}" for axis in AXES)


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, model) with a -1 resolved; raises unless their product is the device
    count."""
    validate_config(mesh_cfg)
    sizes = [mesh_cfg[axis] for axis in AXES]
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % known:
            raise UserError(f"{_describe(mesh_cfg)} need a multiple of {known} devices, but "
                            f"there are {device_count}; choose sizes whose product divides "
                            f"{device_count}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise UserError(f"{_describe(mesh_cfg)} make a mesh of {math.prod(sizes)} devices, "
                        f"but there are {device_count}; make the product {device_count} or "
                        "set one size to -1 (the rest)")
    return tuple(sizes)


def check_model_fits(model_cfg, shape: Sequence[int]) -> None:
    """``model`` must divide the heads and the MLP's hidden units (their axes are split)."""
    model = shape[2]
    hidden = model_cfg.mlp_ratio * model_cfg.d_model
    if model_cfg.num_heads % model:
        raise UserError(f"model.num_heads={model_cfg.num_heads} is not divisible by "
                        f"mesh.model={model}, which splits the heads; choose a mesh.model "
                        "dividing the number of heads")
    if hidden % model:
        raise UserError(f"the MLP's {hidden} hidden units (model.mlp_ratio x model.d_model) "
                        f"are not divisible by mesh.model={model}; choose a mesh.model "
                        "dividing them")


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, model)`` mesh over ``devices`` (default: every device)."""
    return jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)


def param_spec(path: Sequence[str], shape: Sequence[int], mesh_shape: dict) -> P:
    """The partition rule of one parameter: its path (keys), shape and ``{axis: size}``."""
    spec = [None] * len(shape)
    if len(shape) < 2:
        return P()
    model, fsdp = mesh_shape["model"], mesh_shape["fsdp"]
    # The transformer blocks' weights only (the embedding prior's wq, wk have no heads).
    model_axis = next((axis for suffix, axis in MODEL_AXIS.items()
                       if path[0] == "blocks" and tuple(path[-len(suffix):]) == suffix), None)
    if model > 1 and model_axis is not None:
        if shape[model_axis] % model:
            raise ValueError(f"{'.'.join(path)} {tuple(shape)}: axis {model_axis} does not "
                             f"split over model={model}")
        spec[model_axis] = "model"
    if fsdp > 1:
        free = [axis for axis in range(len(shape)) if spec[axis] is None
                and shape[axis] % fsdp == 0]
        if free:
            spec[max(free, key=lambda axis: (shape[axis], -axis))] = "fsdp"
    return P(*spec) if any(spec) else P()


def param_specs(params, mesh: jax.sharding.Mesh):
    """``param_spec`` of every leaf of a parameter tree."""
    sizes = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_spec(_keys(path), np.shape(leaf), sizes), params)


def compute_specs(specs):
    """The parameters as the step computes with them: gathered over ``fsdp``, still split
    over ``model``."""
    def without_fsdp(spec: P) -> P:
        axes = [None if axis == "fsdp" else axis for axis in spec]
        return P(*axes) if any(axes) else P()

    return jax.tree.map(without_fsdp, specs, is_leaf=lambda x: isinstance(x, P))


def state_specs(state: dict, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """Specs of the train state ``{"params", "opt_state", "step", "skipped"}``: each optimizer
    moment as its parameter, everything else replicated."""
    specs = param_specs(state["params"], mesh)
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, state["opt_state"], specs,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    return {**{key: jax.tree.map(lambda _: P(), value) for key, value in state.items()},
            "params": specs, "opt_state": opt_specs}


def named(mesh: jax.sharding.Mesh, specs):
    """A tree of ``PartitionSpec`` as ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches: rows split over ``data`` x ``fsdp``, replicated over ``model``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(shape: Sequence[int]) -> int:
    """How many parts the batch's rows are split into on a (data, fsdp, model) mesh."""
    return shape[0] * shape[1]


def bytes_per_device(tree, shardings) -> int:
    """Bytes of ``tree``'s leaves that one device stores under ``shardings`` (the largest
    shard of each leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(np.shape(leaf))
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
