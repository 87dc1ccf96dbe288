"""The partition rules, the mesh settings, several-process settings and remote workdirs, without
devices: rules are checked on an abstract mesh against a table written here, by hand.

Training on real meshes (8 simulated devices), restoring across meshes and two processes are in
``tests/test_meshes.py`` and ``tests/test_multihost.py`` (slow).
"""

import os

import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import PartitionSpec as P

from configs import common, tiny
from stm_jax import data, files
from stm_jax.errors import UserError
from stm_jax.trainer import metrics, multihost, sharding, steps
from stm_jax.trainer import workdir as workdir_lib
from stm_jax.trainer.loop import validate_config

# The tiny model with 8 heads (d = 32, p = 4, MLP hidden 128, context 32, vocabulary 16): each
# weight's spec on each mesh, as the rules in stm_jax/trainer/sharding.py's docstring say.
EXPECTED = {
    (8, 1, 1): {},  # data parallel: everything replicated
    (2, 4, 1): {"wq": P("fsdp", None, None), "wo": P(None, None, "fsdp"),
                "fc.kernel": P(None, "fsdp"), "proj.kernel": P("fsdp", None),
                "token_embed.embedding": P(None, "fsdp"), "position_embed": P("fsdp", None)},
    (2, 2, 2): {"wq": P("fsdp", "model", None), "wo": P("model", None, "fsdp"),
                "fc.kernel": P("fsdp", "model"), "proj.kernel": P("model", "fsdp"),
                "token_embed.embedding": P(None, "fsdp"), "position_embed": P("fsdp", None)},
    (1, 1, 8): {"wq": P(None, "model", None), "wo": P("model", None, None),
                "fc.kernel": P(None, "model"), "proj.kernel": P("model", None)},
    (1, 8, 1): {"wq": P("fsdp", None, None), "wo": P(None, None, "fsdp"),
                "fc.kernel": P(None, "fsdp"), "proj.kernel": P("fsdp", None),
                "token_embed.embedding": P(None, "fsdp"), "position_embed": P("fsdp", None)},
}


def expected_spec(mesh_shape, name: str) -> P:
    """The table's spec for a parameter path ``blocks.0.wk``; vectors and unnamed ones: P()."""
    table = EXPECTED[mesh_shape]
    short = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    short = "wq" if short in ("wk", "wv") else short
    return table.get(short, P())


def tiny_state(vocab_size=16, num_heads=8):
    config = tiny.get_config("margin")
    config.model.update(vocab_size=vocab_size, num_heads=num_heads)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    return steps.abstract_state(config, tx)[1], tx


def flat_specs(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): spec
            for path, spec in leaves}


@pytest.mark.parametrize("mesh_shape", list(EXPECTED), ids=str)
def test_partition_rules_match_the_table(mesh_shape):
    state, tx = tiny_state()
    mesh = jax.sharding.AbstractMesh(mesh_shape, sharding.AXES)
    specs = sharding.state_specs(state, tx, mesh)
    params = flat_specs(specs["params"])
    assert len(params) == 20
    for name, spec in params.items():
        assert spec == expected_spec(mesh_shape, name), name
    # Each optimizer moment follows its parameter; counters are replicated.
    adam = specs["opt_state"][1][0]
    assert flat_specs(adam.mu) == params and flat_specs(adam.nu) == params
    assert adam.count == P() and specs["step"] == P() and specs["skipped"] == P()
    # The step computes with the weights gathered over fsdp, still split over model.
    gathered = flat_specs(sharding.compute_specs(specs["params"]))
    assert all("fsdp" not in spec for spec in gathered.values())
    assert gathered["blocks.1.wo"] == (P("model", None, None) if mesh_shape[2] > 1 else P())


def test_the_embedding_priors_weights_have_no_heads_to_split():
    """Its wq, wk are (p, p): fsdp may split them, model never does."""
    mesh = {"fsdp": 1, "model": 2}
    assert sharding.param_spec(("prior", "wq"), (8, 8), mesh) == P()
    assert sharding.param_spec(("blocks", "0", "wq"), (32, 8, 4), mesh) == P(None, "model", None)


def test_fsdp_takes_the_largest_axis_it_divides_or_none():
    assert sharding.param_spec(("token_embed", "embedding"), (65, 384), {"fsdp": 8, "model": 1}) \
        == P(None, "fsdp")  # 65 characters do not split in 8
    assert sharding.param_spec(("x",), (6, 10), {"fsdp": 4, "model": 1}) == P()
    assert sharding.param_spec(("blocks", "0", "fc", "bias"), (128,), {"fsdp": 4, "model": 2}) \
        == P()  # vectors stay whole


def test_bytes_per_device_counts_shards():
    mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.AXES)
    state, tx = tiny_state()
    specs = sharding.state_specs(state, tx, mesh)
    shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                             is_leaf=lambda x: isinstance(x, P))
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    split = sharding.bytes_per_device(state, shardings)
    assert whole / 8 < split < whole / 6  # vectors and counters are whole on every device


@pytest.mark.parametrize("mesh, devices, expected", [
    ({"data": -1, "fsdp": 1, "model": 1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "model": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": 1, "model": -1}, 4, (1, 1, 4)),
])
def test_mesh_shape_fills_in_the_rest(mesh, devices, expected):
    assert sharding.mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize("mesh, devices, message", [
    ({"data": -1, "fsdp": -1, "model": 1}, 8, "more than one -1"),
    ({"data": 0, "fsdp": 1, "model": 1}, 8, "must be positive integers or -1"),
    ({"data": 2, "fsdp": 2, "model": 1}, 8, "make a mesh of 4 devices, but there are 8"),
    ({"data": 3, "fsdp": -1, "model": 1}, 8, "need a multiple of 3 devices, but there are 8"),
])
def test_bad_meshes_are_one_line(mesh, devices, message):
    with pytest.raises(UserError, match=message):
        sharding.mesh_shape(mesh, devices)


def tiny_config(**overrides):
    config = tiny.get_config("margin")
    config.data.text_file = "unused.txt"
    config.update(overrides)
    return config


def test_the_config_is_checked_against_this_machines_devices():
    config = tiny_config()
    config.mesh.update(data=1, fsdp=2)
    with pytest.raises(UserError, match=r"make a mesh of 2 devices, but there are 1"):
        validate_config(config)
    config.mesh.data = -1
    with pytest.raises(UserError, match=r"need a multiple of 2 devices, but there are 1"):
        validate_config(config)
    with pytest.raises(UserError, match=r"model\.num_heads=2 is not divisible by "
                                        r"mesh\.model=8"):
        sharding.check_model_fits(config.model, (1, 1, 8))
    validate_config(tiny_config())  # the defaults: data parallel over what there is


def test_distributed_settings_are_all_or_none():
    cfg = common.base_config().distributed
    multihost.validate_config(cfg)
    assert not multihost.wanted(cfg)
    cfg.coordinator_address = "localhost:1234"
    with pytest.raises(UserError, match="give all three"):
        multihost.validate_config(cfg)
    cfg.update(num_processes=2, process_id=2)
    with pytest.raises(UserError, match="process_id=2 must be below"):
        multihost.validate_config(cfg)
    cfg.process_id = 1
    multihost.validate_config(cfg)
    assert multihost.wanted(cfg)


def test_old_distributed_bool_becomes_the_section():
    for old in (False, True):
        upgraded = workdir_lib.upgrade_config({"distributed": old})
        assert upgraded["distributed"] == {"enabled": old, "coordinator_address": "",
                                           "num_processes": 0, "process_id": -1}
        assert upgraded["mesh"] == {"data": -1, "fsdp": 1, "model": 1}


def test_one_process_is_primary_and_feeds_every_row():
    assert multihost.is_primary()
    assert multihost.on_primary(lambda: 7) == 7
    with pytest.raises(UserError, match="refused"):
        multihost.on_primary(lambda: (_ for _ in ()).throw(UserError("refused")))
    mesh = sharding.make_mesh((1, 1, 1))
    batch = np.arange(24, dtype=np.int32).reshape(8, 3)
    where = sharding.batch_sharding(mesh)
    assert multihost.local_rows(where, batch.shape) == slice(0, 8)
    np.testing.assert_array_equal(multihost.shard_batch(batch, where), batch)
    vote = multihost.StopVote(mesh)
    assert not vote.stop_now(False) and vote.stop_now(True)


def test_a_gs_workdir_stays_a_bucket(tmp_path, monkeypatch):
    """gs://bucket/run (served from a local folder by epath's test backend) is created, written
    and read as the bucket's objects; no local folder named "gs:" appears, and no lock."""
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket"
    seen = []

    def local(path):
        path = os.fspath(path)
        if path.startswith("gs://bucket"):
            seen.append(path)
            return str(bucket) + path[len("gs://bucket"):]
        return path

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def redirect_two(original, source, target, *args, **kwargs):
        return original(local(source), local(target), *args, **kwargs)

    mocks = {name: redirect for name in ("exists", "glob", "isdir", "listdir", "makedirs",
                                         "mkdir", "open", "remove", "rmtree", "stat", "walk")}
    mocks.update({name: redirect_two for name in ("copy", "rename", "replace")})
    config = tiny_config()
    config.model.vocab_size = 3
    with epath.testing.mock_epath(**mocks):
        workdir = workdir_lib.preflight("gs://bucket/run", config)
        assert str(workdir) == "gs://bucket/run" and not files.is_local(workdir)
        workdir = workdir_lib.create(workdir)
        assert str(workdir) == "gs://bucket/run"
        files.write_json(workdir / workdir_lib.CONFIG_FILE, config.to_dict())
        assert workdir_lib.read_config("gs://bucket/run").model.vocab_size == 3
        workdir_lib.preflight("gs://bucket/run", config)  # the saved config agrees
        vocab = data.Vocab.from_text("abc")
        vocab.save(workdir / data.VOCAB_FILENAME)
        assert data.Vocab.load(workdir / data.VOCAB_FILENAME) == vocab
        for step in (1, 2):
            with metrics.MetricsWriter(workdir, tensorboard=False) as writer:
                writer.write(step, {"loss": 1.0 / step})
        assert [r["loss"] for r in metrics.read_metrics("gs://bucket/run")] == [1.0, 0.5]
        with workdir_lib.WorkdirLock(workdir) as lock:
            assert not lock.locks
    assert seen and not (tmp_path / "gs:").exists()
    assert sorted(p.name for p in (bucket / "run").iterdir()) == [
        "config.json", "metrics.jsonl", "vocab.json"]
