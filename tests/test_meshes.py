"""Meshes on 8 simulated CPU devices: every (data, fsdp, model) mesh trains the tiny config with
the barrier to the losses of one device, with its parameters and optimizer state sharded as the
partition rules say (read back from what the checkpoint recorded), each head's Jacobian blocks
computed on the devices that hold the head, and a checkpoint saved on (2, 2, 2) restores on 4
devices and on 1, bitwise.

Three subprocesses (8, 4 and 1 devices), about two minutes on 2 cores: slow.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_helpers import ROOT, write_text
from jax.sharding import PartitionSpec as P
from test_sharding import expected_spec

from stm_jax.trainer import metrics

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("meshes")]

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
NUM_STEPS = 4

PRELUDE = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax
from configs import tiny
from stm_jax.trainer import checkpointing, sharding, steps
from stm_jax.trainer.loop import train_and_evaluate
from stm_jax.trainer.workdir import checkpoint_metadata, read_config

def tiny_config(mesh):
    config = tiny.get_config("margin")  # the barrier on, exact
    config.update(num_steps={steps}, log_every=1, eval_every={steps}, checkpoint_every={steps},
                  progress=False, peak_flops=1e11)
    config.model.num_heads = 8  # mesh.model = 8 splits them one per device
    config.mesh.update(data=mesh[0], fsdp=mesh[1], model=mesh[2])
    config.data.text_file = {text!r}
    return config

def restore(workdir, mesh_shape, out):
    '''The latest checkpoint of workdir placed on a mesh of this process's devices; its
    parameters to out (.npz); {{name: spec}} of where each parameter landed.'''
    config = read_config(workdir)
    mesh = sharding.make_mesh(mesh_shape)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    _, shapes = steps.abstract_state(config, tx)
    where = sharding.named(mesh, sharding.state_specs(shapes, tx, mesh))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, where)
    with checkpointing.Checkpointer(workdir + "/checkpoints") as ckpt:
        state, _ = ckpt.restore(ckpt.latest_step(), abstract)
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    np.savez(out, **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    return {{jax.tree_util.keystr(p): list(x.sharding.spec) for p, x in leaves}}
"""

EIGHT_DEVICES = PRELUDE + """
out = {{}}
for mesh in {meshes!r}:
    workdir = {tmp!r} + "/mesh_%d_%d_%d" % mesh
    out[str(mesh)] = train_and_evaluate(tiny_config(mesh), workdir)["val_loss"]
out["restored_222"] = restore({tmp!r} + "/mesh_2_2_2", (2, 2, 2), {tmp!r} + "/on_8.npz")

# Where the barrier's per-head blocks are factorised on (1, 1, 8): the LAPACK LU calls of the
# compiled step, and every collective in it.
config = tiny_config((1, 1, 8))
config.model.vocab_size = 16
mesh = sharding.make_mesh((1, 1, 8))
tx = steps.make_optimizer(config.optimizer, config.num_steps)
graphdef, shapes = steps.abstract_state(config, tx)
specs = sharding.state_specs(shapes, tx, mesh)
where = sharding.named(mesh, specs)
state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                     where)
batch = jax.ShapeDtypeStruct((config.batch_size, config.model.context), np.int32,
                             sharding=sharding.batch_sharding(mesh))
program = steps.compile_train_steps(
    graphdef, config, tx, state, batch, batch, state_sharding=where,
    batch_sharding=sharding.batch_sharding(mesh),
    compute_sharding=sharding.named(mesh, sharding.compute_specs(specs["params"])))[1.0]
out["hlo"] = program.as_text()
print(json.dumps(out))
"""

FOUR_DEVICES = PRELUDE + """
from stm_jax.trainer.checkpointing import CheckpointError
workdir = {tmp!r} + "/mesh_2_2_2"
out = {{"restored_122": restore(workdir, (1, 2, 2), {tmp!r} + "/on_4.npz")}}
config = read_config(workdir)
from stm_jax import data
foreign = checkpoint_metadata(config, data.Vocab.load(workdir + "/vocab.json"))
foreign["model"]["d_model"] = 64
with checkpointing.Checkpointer(workdir + "/checkpoints") as ckpt:
    try:
        ckpt.restore(ckpt.latest_step(), None, expected_metadata=foreign)
    except CheckpointError as error:
        out["foreign"] = str(error)
print(json.dumps(out))
"""

ONE_DEVICE = PRELUDE + """
out = {{"val_loss": train_and_evaluate(tiny_config((1, 1, 1)), {tmp!r} + "/one")["val_loss"],
        "restored_111": restore({tmp!r} + "/mesh_2_2_2", (1, 1, 1), {tmp!r} + "/on_1.npz")}}
print(json.dumps(out))
"""


def run_script(script: str, devices: int, tmp: Path, text: Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    source = script.format(root=str(ROOT), steps=NUM_STEPS, text=str(text), tmp=str(tmp),
                           meshes=MESHES)
    result = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meshes")
    text = write_text(tmp / "corpus.txt", num_lines=600)
    eight = run_script(EIGHT_DEVICES, 8, tmp, text)
    four = run_script(FOUR_DEVICES, 4, tmp, text)
    one = run_script(ONE_DEVICE, 1, tmp, text)
    return tmp, eight, four, one


def train_records(workdir: Path) -> list[dict]:
    return metrics.read_metrics(workdir, split="train")


def stored_specs(workdir: Path) -> dict:
    """{leaf name: partition spec} as the checkpoint of the last step recorded them."""
    tree = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / str(NUM_STEPS) / "state")
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    return {leaf.name: P(*leaf.sharding.partition_spec) for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_each_mesh_trains_like_one_device_with_its_shardings(runs, mesh):
    tmp, eight, _, one = runs
    workdir = tmp / "mesh_{}_{}_{}".format(*mesh)
    reference, records = train_records(tmp / "one"), train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "ce", "barrier"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference],
                                   rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(eight[str(mesh)], one["val_loss"], rtol=1e-5)
    specs = stored_specs(workdir)
    assert len(specs) == 3 * 20 + 4  # params, Adam's mu and nu, two counts, step, skipped
    for name, spec in specs.items():
        param = next((name.split(prefix, 1)[1] for prefix in ("params.", "mu.", "nu.")
                      if prefix in name), None)
        assert spec == (P() if param is None else expected_spec(mesh, param)), name


def test_heads_are_factorised_where_they_live(runs):
    """On (1, 1, 8) every device factorises the blocks of its one head (of 8) for the whole
    batch, and no collective gathers anything: the heads meet only in all-reduces."""
    hlo = runs[1]["hlo"]
    lu_calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack_sgetrf' in line]
    assert lu_calls
    for line in lu_calls:
        dims = re.search(r"= \(f32\[([\d,]+)\]", line).group(1)  # the factorised blocks
        assert np.prod([int(d) for d in dims.split(",")]) == 8 * 1 * 32 * 4 * 4, line
        # batch 8, 1 head, 32 tokens, 4 x 4 blocks
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "all-reduce" in hlo


def test_a_checkpoint_of_2x2x2_restores_on_4_devices_and_on_1_bitwise(runs):
    tmp, eight, four, one = runs
    assert four["restored_122"]["['blocks'][0]['wq']"] == ["fsdp", "model", None]
    assert four["restored_122"]["['blocks'][0]['fc']['kernel']"] == ["fsdp", "model"]
    assert set(map(tuple, one["restored_111"].values())) <= {(), (None, None), (None,) * 3}
    saved = np.load(tmp / "on_8.npz")
    for other in ("on_4.npz", "on_1.npz"):
        restored = np.load(tmp / other)
        assert sorted(restored.files) == sorted(saved.files)
        for name in saved.files:
            assert np.array_equal(saved[name], restored[name]), (other, name)
    assert "'model': {" not in four["foreign"]  # one sentence, not a dump
    assert "model.d_model=32, the config asks for 64" in four["foreign"]
    assert "\n" not in four["foreign"]
