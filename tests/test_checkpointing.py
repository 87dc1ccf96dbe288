"""Checkpointer: round trips, retention, killed saves, and restore errors that touch no file."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _train_helpers import snapshot

from stm_jax.trainer.checkpointing import Checkpointer, CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA = {"model": {"d_model": 128, "num_layers": 2}, "vocab_size": 256, "tokens": (1, 2)}


def make_state(scale: float = 1.0) -> dict:
    params = {
        "w": scale * jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4),
        "b": jnp.full((4,), scale, jnp.bfloat16),
        # Large enough for its own data file: OCDBT inlines values of a few bytes in its index.
        "emb": scale * jax.random.normal(jax.random.PRNGKey(0), (64, 64), jnp.float32),
    }
    # optax states are NamedTuples: exercises attribute key paths in the tree check.
    return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(7)}


def replicated():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_of(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def assert_equal_trees(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def saved(directory: Path, steps=(5,), **kwargs) -> Checkpointer:
    with Checkpointer(directory, **kwargs) as ckpt:
        for step in steps:
            assert ckpt.save(step, make_state(step), metadata=METADATA, force=True)
    return ckpt


def test_round_trip_async_with_shardings(tmp_path):
    state = make_state(2.0)
    expected = jax.tree.map(np.array, state)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(3, state, metadata=METADATA, force=True)
        # The host copy is taken before save returns, so donated/deleted buffers are fine.
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait()
        assert ckpt.latest_step() == 3
    with Checkpointer(tmp_path) as ckpt:  # a fresh process's view
        restored, metadata = ckpt.restore(
            3, abstract_of(expected, replicated()), expected_metadata=METADATA
        )
    assert_equal_trees(restored, expected)
    assert restored["params"]["b"].dtype == jnp.bfloat16
    assert restored["params"]["w"].sharding == replicated()
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert metadata == {"model": {"d_model": 128, "num_layers": 2}, "vocab_size": 256,
                        "tokens": [1, 2]}


def test_interval_force_and_repeated_step(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=2, async_save=False) as ckpt:
        assert not ckpt.save(1, make_state(), metadata=METADATA)
        assert ckpt.save(2, make_state(), metadata=METADATA)
        assert ckpt.save(3, make_state(), metadata=METADATA, force=True)
        assert not ckpt.save(3, make_state(), metadata=METADATA, force=True)  # already saved
        with pytest.raises(CheckpointError, match="newer step 3"):
            ckpt.save(1, make_state(), metadata=METADATA, force=True)
        assert ckpt.all_steps() == [2, 3]


def test_keeps_latest_n(tmp_path):
    saved(tmp_path, steps=range(1, 6), max_to_keep=2)
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [4, 5]


KILLED_SAVE = """
import os, pathlib, signal, sys, time
import jax.numpy as jnp
from stm_jax.trainer.checkpointing import Checkpointer
directory = pathlib.Path(sys.argv[1])
ckpt = Checkpointer(directory)
ckpt.save(1, {"w": jnp.ones((8, 8))}, metadata={}, force=True)
ckpt.wait()
big = {name: jnp.ones((2048, 2048)) for name in "abcd"}  # 64 MB: a write of many milliseconds
ckpt.save(2, big, metadata={}, force=True)
# Orbax may create the tmp folder on its background thread: die as soon as it appears.
while not list(directory.glob("2.orbax-checkpoint-tmp*")):
    time.sleep(0.0005)
os.kill(os.getpid(), signal.SIGKILL)  # the write of step 2 is still in flight
"""


def test_latest_step_ignores_tmp_folder_of_killed_save(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(tmp_path)],
                           env=env, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers[0] == "1" and leftovers[1].startswith("2.orbax-checkpoint-tmp"), leftovers
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore(2, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)})
        state, _ = ckpt.restore(1, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)})
    np.testing.assert_array_equal(state["w"], np.ones((8, 8)))
    assert snapshot(tmp_path) == before


def test_metadata_mismatch_names_key_and_path_and_touches_nothing(tmp_path):
    saved(tmp_path)
    before = snapshot(tmp_path)
    other = {**METADATA, "model": {"d_model": 64, "num_layers": 2}, "seed": 1}
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as error:
        ckpt.restore(5, abstract_of(make_state()), expected_metadata=other)
    message = str(error.value)
    assert f"checkpoint {tmp_path / '5'} was written for model.d_model=128" in message
    assert "the config asks for 64" in message
    assert "differing keys: model.d_model, seed" in message
    assert "untouched" in message
    assert snapshot(tmp_path) == before


def test_tree_mismatch_names_leaves_with_both_shapes(tmp_path):
    saved(tmp_path)
    before = snapshot(tmp_path)
    abstract = abstract_of(make_state())
    abstract["params"]["w"] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    abstract["params"]["b"] = jax.ShapeDtypeStruct((4,), jnp.float32)  # saved as bfloat16
    abstract["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as error:
        ckpt.restore(5, abstract, expected_metadata=METADATA)
    message = str(error.value)
    assert str(tmp_path / "5") in message
    expects = "in the checkpoint, this run expects"
    assert f"params.w is (3, 4) float32 {expects} (3, 5) float32" in message
    assert f"params.b is (4,) bfloat16 {expects} (4,) float32" in message
    assert "missing from the checkpoint: extra" in message
    assert snapshot(tmp_path) == before


def largest_data_file(step_dir: Path) -> Path:
    """The biggest OCDBT data file: it holds the array bytes (the 64 x 64 ``emb``)."""
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda path: path.stat().st_size)


@pytest.mark.parametrize("damaged", [largest_data_file, lambda step_dir: step_dir / "state" /
                                     "_METADATA"], ids=["array-data", "tree-metadata"])
def test_truncated_file_is_reported_and_left_alone(tmp_path, damaged):
    saved(tmp_path, steps=(3, 5))
    path = damaged(tmp_path / "5")
    os.truncate(path, path.stat().st_size // 2)
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 5  # complete as far as Orbax knows
        with pytest.raises(CheckpointError) as error:
            ckpt.restore(5, abstract_of(make_state()), expected_metadata=METADATA)
        message = str(error.value)
        assert f"could not read checkpoint {tmp_path / '5'}" in message
        assert "left untouched" in message and "other complete steps: [3]" in message
        state, _ = ckpt.restore(3, abstract_of(make_state()), expected_metadata=METADATA)
    assert_equal_trees(state, make_state(3))
    assert snapshot(tmp_path) == before


def test_checkpoint_without_metadata_is_refused_by_name(tmp_path):
    with ocp.CheckpointManager(tmp_path) as manager:  # someone else's layout: state only
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(make_state())))
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="no 'metadata'"):
        ckpt.restore(5, abstract_of(make_state()), expected_metadata=METADATA)
    assert snapshot(tmp_path) == before
