"""Training end to end on the tiny config: resume is exact, data parallelism changes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _train_helpers import write_text

from configs import tiny
from stm_jax.errors import UserError
from stm_jax.trainer import checkpointing, metrics, steps
from stm_jax.trainer import loop as train
from stm_jax.trainer.workdir import read_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "corpus.txt", num_lines=600)


def tiny_config(text_file, variant="margin", **overrides):
    config = tiny.get_config(variant)
    config.data.text_file = str(text_file)
    config.progress = False
    config.update(overrides)
    return config


def restored_params(workdir):
    """The parameters of a workdir's latest checkpoint as numpy arrays."""
    config = read_config(workdir)
    _, state = steps.init_state(config, steps.make_optimizer(config.optimizer, config.num_steps))
    with checkpointing.Checkpointer(Path(workdir) / "checkpoints") as ckpt:
        restored, _ = ckpt.restore(ckpt.latest_step(), state)
    return jax.tree.map(np.asarray, restored["params"])


def test_train_writes_metrics_checkpoints_and_learns(text_file, tmp_path):
    config = tiny_config(text_file, num_steps=20, log_every=5, eval_every=10,
                         checkpoint_every=10, peak_flops=2e11)
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["status"] == "finished" and summary["step"] == 20
    records = metrics.read_metrics(tmp_path, split="train")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    first, last = records[0], records[-1]
    for key in ("loss", "ce", "barrier", "bpc", "tokens_per_s", "mfu", "infeasible_tokens"):
        assert key in last, key
    assert last["ce"] < first["ce"]
    setup = metrics.read_metrics(tmp_path, split="setup")[0]
    assert setup["compile_s"] > 0 and setup["peak_flops"] == 2e11  # the given peak, not measured
    with checkpointing.Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [10, 20]
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "train_summary.json").exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_negative_peak_flops_is_refused(text_file):
    with pytest.raises(UserError, match="peak_flops=-1.0 must be >= 0"):
        train.validate_config(tiny_config(text_file, peak_flops=-1.0))


@pytest.mark.slow  # ~60 s; the default suite checks resumption end to end in
# test_reliability.py (SIGINT, SIGTERM and kill -9, each resumed run equal to an unbroken one)
def test_resume_equals_uninterrupted_run_bitwise(text_file, tmp_path):
    straight = tiny_config(text_file, num_steps=12, checkpoint_every=4)
    train.train_and_evaluate(straight, tmp_path / "straight")
    # Stop at step 8 on the same schedule (decay_steps fixed), then resume to 12.
    first_leg = tiny_config(text_file, num_steps=8, checkpoint_every=4)
    first_leg.optimizer.decay_steps = 12
    train.train_and_evaluate(first_leg, tmp_path / "resumed")
    second_leg = tiny_config(text_file, num_steps=12, checkpoint_every=4)
    second_leg.optimizer.decay_steps = 12
    summary = train.train_and_evaluate(second_leg, tmp_path / "resumed")
    assert summary["step"] == 12
    expected, got = restored_params(tmp_path / "straight"), restored_params(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lazy_barrier_runs_its_drawn_weights(text_file, tmp_path):
    """Each step runs the program of its drawn barrier weight (a function of seed and step, so
    a resumed run draws the same: see test_model_objective); weight-0 steps have no barrier."""
    config = tiny_config(text_file, num_steps=8, checkpoint_every=8, log_every=1)
    config.objective.barrier_step_fraction = 0.5
    train.train_and_evaluate(config, tmp_path)
    weights = steps.barrier_weights(config)
    records = metrics.read_metrics(tmp_path, split="train")
    assert [r["barrier_weight"] for r in records] == weights.tolist()
    assert set(weights.tolist()) == {0.0, 2.0}  # both kinds of step ran
    assert all(("barrier" in r) == (r["barrier_weight"] > 0) for r in records)
    assert all(np.isfinite(r["barrier"]) for r in records if "barrier" in r)


MULTI_DEVICE_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax
from configs import tiny
from stm_jax.trainer import loop as train
config = tiny.get_config("margin")
config.update(num_steps=4, log_every=1, eval_every=4, checkpoint_every=4, progress=False,
              peak_flops=1e11)  # no matmul measured at start
config.data.text_file = {text!r}
summary = train.train_and_evaluate(config, {workdir!r})
print(json.dumps({{"devices": jax.device_count(), "val_loss": summary["val_loss"]}}))
"""


def run_with_devices(count, text_file, workdir):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    script = MULTI_DEVICE_SCRIPT.format(root=str(ROOT), text=str(text_file), workdir=str(workdir))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_four_simulated_devices_match_one(text_file, tmp_path):
    single = run_with_devices(1, text_file, tmp_path / "one")
    multi = run_with_devices(4, text_file, tmp_path / "four")
    assert (single["devices"], multi["devices"]) == (1, 4)
    np.testing.assert_allclose(multi["val_loss"], single["val_loss"], rtol=1e-5)
    losses = {n: [r["loss"] for r in metrics.read_metrics(tmp_path / n, split="train")]
              for n in ("one", "four")}
    np.testing.assert_allclose(losses["four"], losses["one"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(restored_params(tmp_path / "one")),
                    jax.tree.leaves(restored_params(tmp_path / "four")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
