"""atomic_files: a finished write replaces the file; a failed one leaves it as it was."""

import os

import pytest

from stm_jax import files


def test_write_creates_folders_and_replaces_content(tmp_path):
    path = tmp_path / "new" / "summary.json"
    files.write_text(path, "first")
    files.write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["summary.json"]  # no temp file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    files.write_text(path, "finished results")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        files.write_bytes(path, b"half")
    assert path.read_text() == "finished results"
    assert os.listdir(tmp_path) == ["report.md"]


def test_file_permissions_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        files.write_text(tmp_path / "vocab.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "vocab.json").stat().st_mode & 0o777 == 0o644
