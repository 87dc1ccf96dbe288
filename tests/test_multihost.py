"""Two processes on localhost (``jax.distributed`` with CPU collectives), as the README runs them:
they train one run with its parameters split over both (FSDP, one device each), a second job on
the same workdir is refused by all of its processes, SIGTERM sent to both (and later to one of
them) stops them at one step they agree on and saves it, the same commands resume, and the run
ends bitwise equal to a single process with two devices and the same mesh (every collective
sums two addends, so the order of the sum cannot differ). One metrics file, one lock, one
config.json.

About two and a half minutes on 2 cores: slow.
"""

import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _train_helpers import (
    Training,
    assert_states_equal,
    checkpoint_steps,
    restored_state,
    run_train,
    snapshot,
    train_args,
    write_text,
)

from stm_jax import files

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

NUM_STEPS = 40
SETTINGS = {"num_steps": NUM_STEPS, "checkpoint_every": 20, "eval_every": 20,
            "mesh.data": 1, "mesh.fsdp": -1}  # parameters split over both processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def job(text: Path, workdir: Path, port: int) -> list[list[str]]:
    """The command-line arguments of process 0 and process 1 of one job."""
    return [train_args(text, workdir, **SETTINGS, **{
        "distributed.coordinator_address": f"localhost:{port}",
        "distributed.num_processes": 2, "distributed.process_id": index}) for index in (0, 1)]


def start(args: list[list[str]], env: dict, tmp: Path, name: str) -> list[Training]:
    return [Training(a, env, tmp / f"{name}{i}.err") for i, a in enumerate(args)]


def test_two_processes_stop_together_resume_and_match_one(env, tmp_path):
    text = write_text(tmp_path / "corpus.txt", num_lines=600)
    one_device = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    # The single-process run of the same mesh: 2 devices, (1, 2, 1).
    single = run_train(train_args(text, tmp_path / "single", **SETTINGS),
                       {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert single.returncode == 0, single.describe()

    workdir = tmp_path / "workdir"
    first = start(job(text, workdir, free_port()), one_device, tmp_path, "first")
    try:
        first[0].wait_for(r"^step 2/")
        for process in first:
            process.send(signal.SIGSTOP)  # hold the job, lock taken, while a second one tries
        before = snapshot(workdir)
        with ThreadPoolExecutor(max_workers=2) as pool:
            refused = list(pool.map(lambda args: run_train(args, one_device),
                                    job(text, workdir, free_port())))
        after = snapshot(workdir)
    finally:
        for process in first:
            process.send(signal.SIGCONT)
    for result in refused:  # every process of the second job: one line, exit code 2
        assert result.returncode == 2, result.describe()
        [line] = [line for line in result.stderr_lines if not line.startswith("[Gloo]")]
        assert line.startswith("error: another training run holds the workdir"), line
    assert after == before

    first[0].wait_for(r"^step 5/")
    for process in first:
        process.send(signal.SIGTERM)
    ends = [process.finish() for process in first]
    assert all(end.returncode == 0 for end in ends), [end.describe() for end in ends]
    stopped = int(next(line for line in ends[0].stderr_lines if line.startswith(
        "SIGTERM: saved step")).split()[3])
    assert 5 <= stopped < NUM_STEPS and checkpoint_steps(workdir)[-1] == stopped
    assert not ends[1].steps_logged and "saved step" not in ends[1].stderr  # process 0 speaks

    # Resumed; a signal to process 1 alone stops both, at one step.
    resumed = start(job(text, workdir, free_port()), one_device, tmp_path, "resumed")
    resumed[0].wait_for(rf"^resumed from {workdir}/checkpoints/{stopped}$")
    resumed[0].wait_for(rf"^step {stopped + 3}/")
    resumed[1].send(signal.SIGTERM)
    ends = [process.finish() for process in resumed]
    assert all(end.returncode == 0 for end in ends), [end.describe() for end in ends]
    assert ends[0].steps_logged[0] == stopped + 1
    again = int(next(line for line in ends[0].stderr_lines if line.startswith(
        "SIGTERM or SIGINT on another process: saved step")).split()[8])
    assert stopped + 3 <= again < NUM_STEPS and checkpoint_steps(workdir)[-1] == again

    finished = start(job(text, workdir, free_port()), one_device, tmp_path, "finished")
    ends = [process.finish() for process in finished]
    assert all(end.returncode == 0 for end in ends), [end.describe() for end in ends]
    assert f"resumed from {workdir}/checkpoints/{again}" in ends[0].stdout

    # One record, one lock, one config: process 0's.
    assert sorted(p.name for p in workdir.iterdir()) == [
        ".lock", "checkpoints", "config.json", "metrics.jsonl", "tensorboard",
        "train_summary.json", "vocab.json"]
    records = files.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, NUM_STEPS + 1))
    assert len(list((workdir / "tensorboard").iterdir())) == 3  # one event file per leg

    assert_states_equal(restored_state(tmp_path / "single"), restored_state(workdir))
