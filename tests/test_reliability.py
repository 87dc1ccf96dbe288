"""Faults a training run must survive: signals, kill -9, bad checkpoints, NaN, bad input, two runs.

Each fault is provoked against ``scripts/train.py`` in a subprocess (the tiny config on a
synthetic text) and checked for: the exit code, ONE clear line on stderr, a workdir left as it
was (sha256 of every file before and after), and -- where training goes on -- parameters
bitwise equal to an uninterrupted run. Subprocesses share a persistent JAX compilation cache
(in pytest's cache folder), so only the first run of each setting compiles.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from _train_helpers import (
    NUM_STEPS,
    ROOT,
    Result,
    Training,
    assert_states_equal,
    checkpoint_steps,
    restored_state,
    run_train,
    snapshot,
    train_args,
    train_env,
    write_text,
)

from stm_jax import data
from stm_jax.trainer import checkpointing, metrics, steps
from stm_jax.trainer.preemption import StopRequest
from stm_jax.trainer.workdir import checkpoint_metadata

# One xdist worker runs this module (pytest --dist loadgroup), so its module-scoped
# fixtures are built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("reliability")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file, env):
    """An uninterrupted run: the workdir every resumed run must reproduce bitwise."""
    workdir = tmp_path_factory.mktemp("reference") / "workdir"
    result = run_train(train_args(text_file, workdir), env)
    assert result.returncode == 0, result.describe()
    assert checkpoint_steps(workdir) == [80, 120, 160]
    return workdir


@pytest.fixture(scope="module")
def reference_state(reference):
    return restored_state(reference)


def single_error_line(result: Result) -> str:
    """The one line a user error prints; fails on tracebacks, extra lines or a zero exit."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines) == 1, result.describe()
    line = result.stderr_lines[0]
    assert line.startswith("error: "), line
    return line


def resumed_step(result: Result) -> int:
    match = re.search(r"^resumed from \S+/checkpoints/(\d+)$", result.stdout, re.MULTILINE)
    assert match, result.describe()
    return int(match.group(1))


def preempted_step(result: Result, signal_name: str) -> int:
    """The step a signalled run saved; checks the exit code and the how-to-resume line."""
    assert result.returncode == 0, result.describe()
    match = re.search(rf"^{signal_name}: saved step (\d+) to (\S+)\. Run the same command "
                      r"again to resume from step \1\.$", result.stderr, re.MULTILINE)
    assert match, result.describe()
    assert Path(match.group(2)).is_dir()
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# 1. Preemption: SIGINT / SIGTERM save the current step; the resumed run equals an
#    uninterrupted one.


def test_sigint_then_sigterm_then_finish_equals_uninterrupted_run(
        text_file, env, reference_state, tmp_path):
    workdir, args = tmp_path / "workdir", train_args(text_file, tmp_path / "workdir")

    first = Training(args, env, tmp_path / "first.err")
    first.wait_for(r"^step 5/")
    first.send(signal.SIGINT)
    stopped_at = preempted_step(first.finish(), "SIGINT")
    assert 5 <= stopped_at < NUM_STEPS
    assert checkpoint_steps(workdir)[-1] == stopped_at

    second = Training(args, env, tmp_path / "second.err")
    second.wait_for(rf"^resumed from \S+/checkpoints/{stopped_at}$")
    second.wait_for(rf"^step {stopped_at + 5}/")
    second.send(signal.SIGTERM)
    result = second.finish()
    stopped_again = preempted_step(result, "SIGTERM")
    assert stopped_at + 5 <= stopped_again < NUM_STEPS
    assert result.steps_logged[0] == stopped_at + 1  # no step repeated, none skipped

    last = run_train(args, env)
    assert last.returncode == 0, last.describe()
    assert resumed_step(last) == stopped_again
    assert (workdir / "train_summary.json").exists()
    assert_states_equal(reference_state, restored_state(workdir))


def test_stop_request_sets_the_flag_and_restores_default_actions():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert stop.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.signal_name == "SIGTERM"
        # A second signal would now take the default action: end the process.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert {sig: signal.getsignal(sig) for sig in before} == before


SECOND_SIGNAL = """
import os, signal, sys, time
from stm_jax.trainer.preemption import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    while stop.signal_name is None:
        time.sleep(0.01)
    print("first signal handled", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # stands in for a save that blocks
    print("still running", flush=True)
"""


def test_second_signal_ends_the_process_at_once():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=train_env(None))
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout == "first signal handled\n"
    assert "SIGTERM received: stopping after the current step" in done.stderr
    assert "send it again to exit at once" in done.stderr
    assert time.monotonic() - start < 50


# ---------------------------------------------------------------------------------------------
# 2. kill -9 at a random moment, saving every step: the rerun resumes from the last complete
#    checkpoint and still equals the uninterrupted run.


def test_kill_9_during_async_saves_resumes_from_last_complete_checkpoint(
        text_file, env, reference_state, tmp_path):
    seed = int(os.environ.get("STM_JAX_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    kill_after, delay = rng.randint(3, 12), rng.uniform(0.0, 0.3)
    note = f"(kill after step {kill_after} + {delay:.3f}s; STM_JAX_TEST_SEED={seed})"
    workdir = tmp_path / "workdir"

    run = Training(train_args(text_file, workdir, checkpoint_every=1), env, tmp_path / "k.err")
    run.wait_for(rf"^step {kill_after}/")
    time.sleep(delay)
    run.send(signal.SIGKILL)
    killed = run.finish()
    assert killed.returncode == -signal.SIGKILL, note
    last_logged = killed.steps_logged[-1]
    complete = checkpoint_steps(workdir)
    assert complete, note
    # A partial save (a real one, or a planted one for the next step) must never be resumed.
    partial = workdir / "checkpoints" / f"{complete[-1] + 1}.orbax-checkpoint-tmp"
    if not partial.exists():
        shutil.copytree(workdir / "checkpoints" / str(complete[-1]), partial)
        for file in sorted(partial.rglob("*"))[-3:]:
            if file.is_file():
                file.write_bytes(file.read_bytes()[:10])

    rerun = run_train(train_args(text_file, workdir), env)
    assert rerun.returncode == 0, note + rerun.describe()
    resumed = resumed_step(rerun)
    assert resumed == complete[-1], note
    # Saves start every step and each waits for the previous one: at most two steps are lost.
    assert last_logged - 2 <= resumed <= last_logged, note
    assert_states_equal(reference_state, restored_state(workdir))


# ---------------------------------------------------------------------------------------------
# 3. Corrupt or foreign checkpoints: one line naming the checkpoint and the problem; nothing
#    deleted or overwritten.


def test_truncated_checkpoint_is_refused_and_left_untouched(text_file, env, reference,
                                                           tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(reference, workdir)
    latest = workdir / "checkpoints" / "160"
    data_file = max((p for p in (latest / "state").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    before = snapshot(workdir)

    line = single_error_line(run_train(train_args(text_file, workdir), env))
    assert f"could not read checkpoint {latest}" in line
    assert "truncated or corrupt" in line and "[80, 120]" in line  # the other steps
    assert snapshot(workdir) == before


def write_foreign_checkpoint(directory, text, **model):
    """What a run of the tiny config on ``text`` with ``model`` overrides would have saved."""
    from configs import tiny

    config = tiny.get_config("margin")
    config.model.update(model)
    vocab = data.Vocab.from_text(text)
    config.model.vocab_size = vocab.size
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    _, state = steps.init_state(config, tx)
    with checkpointing.Checkpointer(directory) as ckpt:
        ckpt.save(7, state, metadata=checkpoint_metadata(config, vocab), force=True)


@pytest.mark.parametrize("foreign, expected", [
    ({"model": {"d_model": 16}}, r"model\.d_model=16, the config asks for 32"),
    ({"text": "ABCDEFGH IJKLMNOP\n" * 50}, r"model\.vocab_size=\d+, the config asks for \d+.*"
                                          r"vocab='\\n ABCDEFGHIJKLMNOP'"),
], ids=["other_d_model", "other_vocabulary"])
def test_foreign_checkpoint_is_refused_and_left_untouched(text_file, env, tmp_path, foreign,
                                                          expected):
    workdir = tmp_path / "workdir"
    text = foreign.get("text", text_file.read_text())
    write_foreign_checkpoint(workdir / "checkpoints", text, **foreign.get("model", {}))
    before = snapshot(workdir)

    line = single_error_line(run_train(train_args(text_file, workdir), env))
    assert f"checkpoint {workdir / 'checkpoints' / '7'} was written for" in line
    assert re.search(expected, line), line
    after = snapshot(workdir)
    assert set(after) - set(before) <= {".lock"}  # the workdir lock, empty once released
    assert {name: after[name] for name in before} == before


# ---------------------------------------------------------------------------------------------
# 4. NaN / Inf: "stop" names the step and the term and keeps the last good checkpoint; "skip"
#    drops and counts the bad updates.

BLOW_UP = {"optimizer.learning_rate": 1e30}  # finite after step 2, NaN loss from step 3


def test_nonfinite_loss_stops_with_the_step_and_term_and_keeps_last_checkpoint(
        text_file, env, tmp_path):
    workdir = tmp_path / "workdir"
    result = run_train(train_args(text_file, workdir, checkpoint_every=1, **BLOW_UP), env)
    line = single_error_line(result)
    match = re.search(r"step (\d+): non-finite (ce|barrier)\b.* the last good checkpoint is "
                      r"(\S+)/(\d+)\. Lower the learning rate or set nonfinite_policy='skip'",
                      line)
    assert match, line
    bad_step, good_step = int(match.group(1)), int(match.group(4))
    assert good_step == bad_step - 1 == checkpoint_steps(workdir)[-1]
    state = restored_state(workdir)
    assert int(state["skipped"]) == 0 and int(state["step"]) == good_step
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
    alerts = metrics.read_metrics(workdir, split="alert")
    assert [a["step"] for a in alerts] == [bad_step] and np.isnan(alerts[0]["ce"])
    assert not (workdir / "train_summary.json").exists()


def test_nonfinite_skip_policy_counts_skipped_updates(text_file, env, tmp_path):
    workdir = tmp_path / "workdir"
    result = run_train(train_args(text_file, workdir, nonfinite_policy="skip", **BLOW_UP), env)
    assert result.returncode == 0, result.describe()
    warnings = [line for line in result.stderr_lines if line.startswith("warning: step ")]
    records = metrics.read_metrics(workdir, split="train")
    assert records[-1]["step"] == NUM_STEPS
    skipped = records[-1]["skipped_updates"]
    assert 0 < skipped == len(warnings) < NUM_STEPS
    assert [r["skipped_updates"] for r in records] == sorted(r["skipped_updates"]
                                                              for r in records)
    assert json.loads((workdir / "train_summary.json").read_text())["skipped_updates"] == skipped
    state = restored_state(workdir)
    assert int(state["skipped"]) == skipped
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))  # none applied


def test_infeasible_tokens_and_skipped_updates_are_logged_every_step(reference):
    records = metrics.read_metrics(reference, split="train")
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for record in records:
        assert record["infeasible_tokens"] >= 0 and float(record["infeasible_tokens"]).is_integer()
        assert 0.0 <= record["infeasible_fraction"] <= 1.0
        assert record["skipped_updates"] == 0
    validation = metrics.read_metrics(reference, split="validation")
    assert [r["step"] for r in validation] == [80, 160]
    assert all("infeasible_tokens" in r for r in validation)


# ---------------------------------------------------------------------------------------------
# 5. Bad input: one line saying what is wrong and what to do, exit code 2, workdir unchanged.

SHORT = "to be or not "  # 13 characters


def _bad_input_cases(tmp: Path, text_file: Path, reference: Path) -> dict:
    """name -> (args, extra env, the path that must be unchanged, pattern of the error)."""
    files = tmp / "files"
    files.mkdir()
    (files / "empty.txt").write_bytes(b"")
    (files / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")
                                       * 100)
    (files / "short.txt").write_text(SHORT * 20)  # validation split 26 chars < context + 1
    (files / "short_eval.txt").write_text(SHORT * 100)  # 130 chars < one batch of 8 x 32
    (files / "other.txt").write_text("ABCDEFGH IJKLMNOP\n" * 500)
    (files / "a_file").write_text("not a directory")

    def trained(name):
        shutil.copytree(reference, tmp / name)
        return tmp / name

    def empty(name):
        (tmp / name).mkdir()
        return tmp / name

    fresh = {name: tmp / name for name in ("missing", "short", "unknown_key", "batch",
                                            "microbatches", "heads", "mesh", "partial",
                                            "no_cluster")}
    return {
        "missing_data_file": (train_args(tmp / "no_such.txt", fresh["missing"]), {},
                              fresh["missing"],
                              r"data\.text_file '.*no_such\.txt' does not exist .*check the path"),
        "empty_data_file": (train_args(files / "empty.txt", empty("empty")), {}, tmp / "empty",
                            r"data\.text_file '.*empty\.txt' is empty; give a file with text"),
        "non_utf8_text": (train_args(files / "latin1.txt", trained("latin1")), {},
                          tmp / "latin1", r"is not valid UTF-8: byte offset 3 .*iconv"),
        "split_shorter_than_context": (
            train_args(files / "short.txt", fresh["short"]), {}, fresh["short"],
            r"the validation split has 26 tokens, fewer than context \+ 1 = 33; use a shorter "
            r"context or a longer text"),
        "validation_shorter_than_a_batch": (
            train_args(files / "short_eval.txt", empty("short_eval")), {}, tmp / "short_eval",
            r"too short for one evaluation batch .*fewer than one batch of 8\); use a longer "
            r"text, a larger data\.val_fraction"),
        "other_text_in_trained_workdir": (
            train_args(files / "other.txt", trained("other")), {}, tmp / "other",
            r"the train split has characters not in \S+vocab\.json: .*use a fresh workdir"),
        "unknown_config_key": (train_args(text_file, fresh["unknown_key"], no_such_key=1), {},
                               fresh["unknown_key"],
                               r"--config\.no_such_key: the config has no key 'no_such_key'; "
                               r"check the spelling"),
        # The whole config is checked before any data is read: with no text file the tiny
        # config would fetch Tiny Shakespeare, and the bad key is named first.
        "bad_model_key_before_data": (
            train_args("", fresh["heads"], **{"model.num_heads": 5}), {}, fresh["heads"],
            r"model\.d_model=32 is not divisible by model\.num_heads=5"),
        "negative_lambda": (train_args(text_file, trained("lambda"),
                                       **{"objective.lambda_m": -1}), {}, tmp / "lambda",
                            r"objective\.lambda_m=-1\.0 is negative; it must be >= 0"),
        "batch_not_divisible_by_devices": (
            train_args(text_file, fresh["batch"], batch_size=3),
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, fresh["batch"],
            r"batch_size=3 is not divisible by the 2 devices; use a multiple of 2"),
        "microbatches_do_not_split_the_batch": (
            train_args(text_file, fresh["microbatches"], microbatches=3), {},
            fresh["microbatches"],
            r"microbatches=3 must divide the 8 rows of batch_size=8 on each of 1 device\(s\); "
            r"use a divisor of 8"),
        "mesh_larger_than_the_devices": (
            train_args(text_file, fresh["mesh"], **{"mesh.fsdp": 2}), {}, fresh["mesh"],
            r"mesh\.data=-1, mesh\.fsdp=2, mesh\.model=1 need a multiple of 2 devices, but "
            r"there are 1"),
        "distributed_settings_half_given": (
            train_args(text_file, fresh["partial"],
                       **{"distributed.coordinator_address": "localhost:1"}), {},
            fresh["partial"], r"give all three \(HOST:PORT, N and 0 <= I < N\) or none"),
        "distributed_without_a_cluster": (
            train_args(text_file, fresh["no_cluster"], **{"distributed.enabled": True}), {},
            fresh["no_cluster"], r"jax\.distributed\.initialize could not start .*no TPU pod, "
            r"Slurm or MPI environment was detected"),
        "workdir_is_a_file": (train_args(text_file, files / "a_file"), {}, files / "a_file",
                              r"workdir \S+a_file exists but is not a directory"),
        "workdir_under_a_file": (train_args(text_file, files / "a_file" / "run"), {},
                                 files / "a_file",
                                 r"cannot create workdir \S+a_file/run: \S+a_file is not a "
                                 r"directory"),
    }


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, text_file, reference, env):
    """Every bad-input case, run three at a time: (before, after, result, pattern) by name."""
    tmp = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(tmp, text_file, reference)
    before = {name: snapshot(case[2]) for name, case in cases.items()}

    def run(name):
        args, extra, _, _ = cases[name]
        return run_train(args, {**env, **extra})

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(run, cases), strict=True))
    return {name: (before[name], snapshot(case[2]), results[name], case[3])
            for name, case in cases.items()}


BAD_INPUTS = ["missing_data_file", "empty_data_file", "non_utf8_text",
              "split_shorter_than_context", "validation_shorter_than_a_batch",
              "other_text_in_trained_workdir", "unknown_config_key", "bad_model_key_before_data",
              "negative_lambda",
              "batch_not_divisible_by_devices", "microbatches_do_not_split_the_batch",
              "mesh_larger_than_the_devices", "distributed_settings_half_given",
              "distributed_without_a_cluster",
              "workdir_is_a_file", "workdir_under_a_file"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_changes_nothing(bad_input_runs, case):
    before, after, result, pattern = bad_input_runs[case]
    line = single_error_line(result)
    assert re.search(pattern, line), line
    assert after == before  # a fresh workdir is not created, an existing one is untouched


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the "
                    "workdir_under_a_file case covers a workdir that cannot be written")
def test_read_only_workdir_is_one_line_and_changes_nothing(text_file, env, tmp_path):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        line = single_error_line(run_train(train_args(text_file, workdir), env))
        assert re.search(r"workdir \S+ is not writable", line), line
        assert list(workdir.iterdir()) == []
    finally:
        workdir.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# 6. Two runs on one workdir: the second is refused and changes nothing; the first finishes.


def test_second_run_on_a_busy_workdir_is_refused(text_file, env, reference_state, tmp_path):
    workdir = tmp_path / "workdir"
    args = train_args(text_file, workdir)
    first = Training(args, env, tmp_path / "first.err")
    try:
        first.wait_for(r"^step 1/")
        first.send(signal.SIGSTOP)  # hold it mid-run, lock taken, until the second one is done
        before = snapshot(workdir)
        second = run_train(args, env)
        after = snapshot(workdir)
    finally:
        first.send(signal.SIGCONT)
    line = single_error_line(second)
    assert re.search(rf"another training run holds the workdir \S+ \(pid {first.proc.pid} on "
                     r"host .*Wait for that run to finish, stop it, or pass a different "
                     r"workdir", line), line
    assert after == before

    result = first.finish()
    assert result.returncode == 0, result.describe()
    assert checkpoint_steps(workdir) == [80, 120, 160]
    assert [r["step"] for r in metrics.read_metrics(workdir, split="train")] == \
        list(range(1, NUM_STEPS + 1))
    assert_states_equal(reference_state, restored_state(workdir))
