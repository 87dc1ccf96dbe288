"""A workdir written by an older stm_jax still evaluates and resumes.

``tests/fixtures/old_workdir`` was written by commit 9870288 (configs/tiny.py:margin, 20 steps,
one checkpoint): its config.json and checkpoint metadata lack every key added since. They are
upgraded where they are read (``trainer.workdir.upgrade_config``, ``LEGACY_VALUES``).
"""

import shutil

import numpy as np
import pytest
from _train_helpers import ROOT

from configs import common, tiny
from stm_jax import files
from stm_jax.evaluation import evaluate
from stm_jax.trainer import metrics
from stm_jax.trainer.loop import train_and_evaluate
from stm_jax.trainer.workdir import (
    CONFIG_FILE,
    LEGACY_VALUES,
    read_config,
    upgrade_config,
    upgrade_metadata,
)

FIXTURE = ROOT / "tests" / "fixtures" / "old_workdir"
TEXT = ROOT / "tests" / "fixtures" / "old_workdir_text.txt"


@pytest.fixture
def old_workdir(tmp_path):
    """A copy of the fixture whose data path points at the text (as after moving a run)."""
    workdir = tmp_path / "old"
    shutil.copytree(FIXTURE, workdir)
    saved = files.read_json(workdir / CONFIG_FILE)
    saved["data"]["text_file"] = str(TEXT)
    files.write_json(workdir / CONFIG_FILE, saved)
    return workdir


def test_every_key_added_since_has_a_legacy_value():
    """A new config key needs an entry in LEGACY_VALUES, or old workdirs stop resuming."""
    current = set(files.flatten(common.base_config("margin").to_dict()))
    saved = set(files.flatten(files.read_json(FIXTURE / CONFIG_FILE)))
    assert current - saved <= set(LEGACY_VALUES), current - saved - set(LEGACY_VALUES)


def test_upgrade_fills_missing_keys_and_keeps_saved_values():
    saved = {"objective": {"barrier_fraction": 0.25, "barrier_floor": "-inf"},
             "model": {"d_model": 8}}
    upgraded = upgrade_config(saved)
    assert upgraded["objective"]["barrier_fraction"] == 0.25  # saved wins
    assert upgraded["objective"]["barrier_floor"] == float("-inf")  # read back as a float
    assert upgraded["objective"]["barrier_sampling"] == "shared"  # what older runs drew
    assert upgraded["microbatches"] == 1 and "microbatches" not in saved  # input untouched
    assert upgrade_metadata({"model": {"d_model": 8}, "vocab": "ab"})["vocab"] == "ab"


def test_an_old_workdir_evaluates_and_resumes(old_workdir):
    config = read_config(old_workdir)
    assert config.objective.barrier_fraction == 0.25 and config.num_steps == 20
    results = evaluate.evaluate_workdir(old_workdir, max_batches=1, margin_batches=1,
                                        margin_batch_size=2, support_windows=1)
    assert results["step"] == 20 and np.isfinite(results["splits"]["validation"]["clean"]["bpc"])

    resumed = tiny.get_config("margin")
    resumed.update(num_steps=30, checkpoint_every=10, eval_every=10, keep_checkpoints=1,
                   progress=False, peak_flops=1e11)
    resumed.objective.barrier_fraction = 0.25
    resumed.data.text_file = str(TEXT)
    summary = train_and_evaluate(resumed, old_workdir)
    assert summary["status"] == "finished" and summary["step"] == 30
    [setup] = metrics.read_metrics(old_workdir, split="setup")
    assert setup["step"] == 20  # trained on from the old checkpoint, not from step 0
    assert metrics.read_metrics(old_workdir, split="train")[-1]["step"] == 30
