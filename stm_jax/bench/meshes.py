"""Memory per device on each ``(data, fsdp, model)`` mesh, behind ``scripts/benchmark_meshes.py``.

For each mesh the train step of a config is compiled (never run) with the trainer's shardings
(``trainer/sharding.py``), and two figures are read per device: the bytes of the parameters
and the optimizer state as their shardings place them (exact, from the shapes), and XLA's
account of the compiled step (``benchmark.peak_bytes``: arguments, outputs and temporaries).
Compiling is all it takes, so simulated CPU devices
(``--xla_force_host_platform_device_count``) give the figures of a real slice of that size,
up to the backend's choices of layout and fusion.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from stm_jax.bench.benchmark import peak_bytes
from stm_jax.trainer import sharding, steps

# The meshes of 8 devices whose model axis divides 6 heads (shakespeare_char).
MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2))


def measure(config, mesh_shape) -> dict:
    """The figures of one mesh (a row of the table)."""
    mesh = sharding.make_mesh(mesh_shape)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    graphdef, shapes = steps.abstract_state(config, tx)
    specs = sharding.state_specs(shapes, tx, mesh)
    where = sharding.named(mesh, specs)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, where)
    batch = jax.ShapeDtypeStruct((config.batch_size, config.model.context), np.int32,
                                 sharding=sharding.batch_sharding(mesh))
    start = time.perf_counter()
    programs = steps.compile_train_steps(
        graphdef, config, tx, state, batch, batch, state_sharding=where,
        batch_sharding=sharding.batch_sharding(mesh),
        compute_sharding=sharding.named(mesh, sharding.compute_specs(specs["params"])))
    compile_s = time.perf_counter() - start
    memories = [program.memory_analysis() for program in programs.values()]
    return {
        "mesh": list(mesh_shape),
        "params_bytes": sharding.bytes_per_device(shapes["params"], where["params"]),
        "state_bytes": sharding.bytes_per_device(shapes, where),
        "whole_state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)),
        "peak_bytes": max(peak_bytes(program) for program in programs.values()),
        "temp_bytes": max(memory.temp_size_in_bytes for memory in memories),
        "compile_s": compile_s,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per mesh, memory in MiB, the state against data parallelism's."""
    data_parallel = next((r for r in rows if r["mesh"][1:] == [1, 1]), rows[0])
    lines = ["| mesh (data, fsdp, model) | parameters MiB | parameters + optimizer MiB | "
             "x data parallel | step peak MiB | of which temporaries MiB | compile s |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| ({', '.join(map(str, r['mesh']))}) | {r['params_bytes'] / 2**20:.2f} | "
            f"{r['state_bytes'] / 2**20:.2f} | "
            f"{r['state_bytes'] / data_parallel['state_bytes']:.3f} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {r['temp_bytes'] / 2**20:.1f} | "
            f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def fsdp_target(rows: list[dict], goal: float = 0.3) -> dict:
    """The parameters and optimizer state per device with fsdp = 8 against data parallelism."""
    by_mesh = {tuple(r["mesh"]): r for r in rows}
    ratio = by_mesh[(1, 8, 1)]["state_bytes"] / by_mesh[(8, 1, 1)]["state_bytes"]
    return {"target": "parameters + optimizer state per device, fsdp = 8 / data parallel",
            "measured": ratio, "goal": goal, "met": ratio <= goal}
