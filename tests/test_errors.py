"""One exception type for user mistakes: one ``error:`` line and exit 2; a bug keeps its traceback.

In-process through the scripts' shared start-up (``scripts/_bootstrap.py``), and end to end: a
bug planted in the model while ``scripts/train.py`` runs prints its traceback, not one line.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import ROOT, train_args, train_env, write_text

from stm_jax.errors import UserError
from stm_jax.trainer.checkpointing import CheckpointError
from stm_jax.trainer.workdir import WorkdirError

sys.path.insert(0, str(ROOT / "scripts"))
import _bootstrap  # noqa: E402


def raising(error: BaseException):
    def main(argv):
        raise error

    return main


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    expected = {"bad setting\n  and why": "error: bad setting and why\n",
                "damaged": "error: damaged\n", "busy": "error: busy\n"}
    for error in (UserError("bad setting\n  and why"), CheckpointError("damaged"),
                  WorkdirError("busy")):
        with pytest.raises(SystemExit) as exit_info:
            _bootstrap.run_main(raising(error), [])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == expected[str(error)]


@pytest.mark.parametrize("error", [KeyError("a researcher's key"), ValueError("a bug"),
                                   FileNotFoundError("a bug's file"), TypeError("a bug")],
                         ids=lambda e: type(e).__name__)
def test_every_other_exception_keeps_its_traceback(error, capsys):
    with pytest.raises(type(error)):
        _bootstrap.run_main(raising(error), [])
    assert "error:" not in capsys.readouterr().err


PLANTED_BUG = """
import runpy, sys
from stm_jax import model

def broken_init(self, cfg, **kwargs):
    raise KeyError("planted: a researcher's model edit")

model.GPT.__init__ = broken_init
sys.argv = ["scripts/train.py", *sys.argv[1:]]
sys.path.insert(0, "scripts")  # as running the script puts its folder first
runpy.run_path("scripts/train.py", run_name="__main__")
"""


def test_a_bug_in_training_keeps_its_traceback(tmp_path):
    text = write_text(tmp_path / "corpus.txt", num_lines=300)
    done = subprocess.run([sys.executable, "-c", PLANTED_BUG,
                           *train_args(text, tmp_path / "run")], cwd=ROOT,
                          env=train_env(None), capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr
    assert "KeyError: \"planted: a researcher's model edit\"" in done.stderr
    assert "error: " not in done.stderr


def test_config_errors_name_the_key_before_anything_is_read(tmp_path):
    """validate_config covers every section; each mistake is a UserError naming its key."""
    from configs import tiny
    from stm_jax.trainer import loop

    cases = {"model.num_heads": 5, "model.dropout": 1.5, "model.dtype": "float8",
             "optimizer.learning_rate": 0.0, "optimizer.beta2": 1.0,
             "objective.chunk_size": -1, "data.name": "nope", "eval_batches": -1,
             "microbatches": 0, "nonfinite_policy": "ignore"}
    for key, value in cases.items():
        config = tiny.get_config()
        config.update_from_flattened_dict({key: value})
        with pytest.raises(UserError, match=key.split(".")[-1]):
            loop.validate_config(config)
    assert not Path(tmp_path / "run").exists()
