"""Memory per device on each device mesh: ``python scripts/benchmark_meshes.py``.

Compiles the train step of each of ``--configs`` (the full ``shakespeare_char``, with the
exact barrier and CE-only) on 8 devices for each ``(data, fsdp, model)`` mesh and writes a
table of the parameters' and optimizer state's bytes per device and the compiled step's peak
memory per device to ``--out`` (``meshes.md``, ``meshes.json``). On a CPU the 8 devices are
simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here unless given);
nothing is run, only compiled, so a 2-core machine gives the figures of an 8-device slice.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import _bootstrap  # noqa: E402
import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from stm_jax import files  # noqa: E402
from stm_jax.bench import meshes  # noqa: E402
from stm_jax.errors import UserError  # noqa: E402
from stm_jax.trainer import sharding  # noqa: E402

flags.DEFINE_list("configs", ["shakespeare_char:margin", "shakespeare_char:ce"],
                  "Configs of configs/, with :variant.")
flags.DEFINE_integer("batch_size", 8, "Global batch: one row per batch shard on 8 devices.")
flags.DEFINE_list("meshes", ["x".join(map(str, m)) for m in meshes.MESHES],
                  "Meshes as DATAxFSDPxMODEL.")
flags.DEFINE_string("out", "benchmarks/meshes", "Folder for meshes.json and meshes.md.")
FLAGS = flags.FLAGS


def load_config(spec: str):
    import importlib

    name, _, variant = spec.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    config.model.vocab_size = 65  # Tiny Shakespeare's character set
    config.batch_size = FLAGS.batch_size
    return config


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    configs = {spec: load_config(spec) for spec in FLAGS.configs}
    shapes = [tuple(int(n) for n in mesh.split("x")) for mesh in FLAGS.meshes]
    for shape in shapes:  # every mesh checked before anything compiles
        mesh_cfg = dict(zip(sharding.AXES, shape, strict=True))
        if sharding.mesh_shape(mesh_cfg, jax.device_count()) != shape:
            raise UserError(f"--meshes: {shape} is not a mesh of the {jax.device_count()} "
                            "devices")
        for config in configs.values():
            sharding.check_model_fits(config.model, shape)
    machine = (f"{platform.processor() or platform.machine()}, {jax.device_count()} x "
               f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    command = " ".join(["python", *sys.argv])
    results, sections = [], []
    for spec, config in configs.items():
        rows = []
        for shape in shapes:
            rows.append(meshes.measure(config, shape))
            print(f"{spec} on {shape}: compiled in {rows[-1]['compile_s']:.1f}s", flush=True)
        target = meshes.fsdp_target(rows) if {(8, 1, 1), (1, 8, 1)} <= set(shapes) else None
        results.append({"config": spec, "rows": rows, "target": target})
        sections += [f"## {spec}, batch {FLAGS.batch_size}", "", meshes.format_table(rows), ""]
        if target:
            sections += [f"Target: {target['target']}: {target['measured']:.3f} (goal <= "
                         f"{target['goal']}, {'met' if target['met'] else 'NOT met'}).", ""]
    markdown = "\n".join(["# Memory per device on each mesh", "",
                          f"Machine: {machine}. Command: `{command}`", "", *sections])
    files.write_text(Path(FLAGS.out) / "meshes.md", markdown)
    files.write_json(Path(FLAGS.out) / "meshes.json",
                     {"batch_size": FLAGS.batch_size, "machine": machine, "command": command,
                      "configs": results}, indent=2)
    print("\n" + markdown, flush=True)


if __name__ == "__main__":
    _bootstrap.run(main)
