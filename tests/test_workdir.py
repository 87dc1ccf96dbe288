"""Workdir checks and the one-run-per-workdir lock, including a holder killed with SIGKILL."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stm_jax.errors import UserError
from stm_jax.trainer.workdir import LOCK_NAME, WorkdirError, WorkdirLock, create

REPO_ROOT = Path(__file__).resolve().parents[1]

HOLD_LOCK = """
import sys, time
from stm_jax.trainer.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_create_creates_missing_dirs_and_leaves_nothing_behind(tmp_path):
    workdir = create(tmp_path / "runs" / "a")
    assert workdir == (tmp_path / "runs" / "a").resolve() and workdir.is_dir()
    assert list(workdir.iterdir()) == []
    assert create(workdir) == workdir  # an existing directory is fine


def test_create_rejects_a_file(tmp_path):
    path = tmp_path / "workdir"
    path.write_text("not a directory")
    with pytest.raises(WorkdirError, match="exists but is not a directory"):
        create(path)
    with pytest.raises(UserError, match="cannot create workdir"):  # WorkdirError is one
        create(path / "sub")


def test_create_rejects_unwritable_dir(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(WorkdirError, match="is not writable: Permission denied"):
        create(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_create_rejects_read_only_dir_for_real(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match="not writable"):
            create(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_lock_is_exclusive_within_a_process_and_released_on_exit(tmp_path):
    with WorkdirLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with WorkdirLock(tmp_path):
        pass


def test_lock_refused_while_another_process_holds_it_and_freed_by_sigkill(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError) as error:
            WorkdirLock(tmp_path).acquire()
        message = str(error.value)
        assert "another training run holds the workdir" in message
        assert f"pid {holder.pid}" in message and "different workdir" in message
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait(timeout=30)
        holder.stdout.close()
    assert holder.returncode == -9
    with WorkdirLock(tmp_path):  # the kernel dropped the dead holder's lock
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
