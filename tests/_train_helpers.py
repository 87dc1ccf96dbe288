"""Running ``scripts/train.py`` as a subprocess in tests: a small text, the tiny config, output.

Every run uses ``configs/tiny.py:margin`` with the same ``num_steps`` (the learning-rate schedule
is compiled into the step, so equal settings share one compiled program) and a persistent JAX
compilation cache shared by the test module, so only the first run of a setting compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np

from stm_jax.trainer import checkpointing, steps
from stm_jax.trainer.workdir import read_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
NUM_STEPS = 160  # long enough (~2 s at ~14 ms a step) for a signal to land mid-run
TIMEOUT_S = 240
STEP_LINE = re.compile(r"^step (\d+)/\d+ ")
# XLA's own C++ log lines (e.g. the compilation cache's "Assume version compatibility"
# warning); everything else on stderr is the program's.
_XLA_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w./-]+:\d+\] ")


def write_text(path: Path, num_lines: int = 2000, seed: int = 0,
               words: tuple[str, ...] = ("to", "be", "or", "not", "that", "is", "the",
                                         "question", "whether", "tis", "nobler")) -> Path:
    """A synthetic corpus of random words, ``num_lines`` lines of ten words."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(list(words), size=10)) for _ in range(num_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(text_file: Path, workdir: Path, **overrides) -> list[str]:
    """Command-line arguments for the tiny config; ``overrides`` become ``--config.k=v``."""
    settings = {"num_steps": NUM_STEPS, "log_every": 1, "eval_every": 80,
                "checkpoint_every": 40, "data.text_file": str(text_file),
                "peak_flops": 1e11, **overrides}  # a given peak: no matmul measured at start
    return ["--config=configs/tiny.py:margin", f"--workdir={workdir}",
            *(f"--config.{key}={value}" for key, value in settings.items())]


def train_env(cache_dir: Path | None, **extra: str) -> dict[str, str]:
    """One CPU device (unless ``XLA_FLAGS`` is given) and the shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra)
    return env


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        """The program's stderr lines, without XLA's C++ log lines."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not _XLA_LOG_LINE.match(line)]

    @property
    def steps_logged(self) -> list[int]:
        return [int(m.group(1)) for m in map(STEP_LINE.match, self.stdout.splitlines()) if m]

    def describe(self) -> str:
        return (f"exit code {self.returncode}\n--- stdout (end) ---\n{self.stdout[-3000:]}\n"
                f"--- stderr (end) ---\n{self.stderr[-3000:]}")


def run_train(args: list[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> Result:
    """``scripts/train.py args`` to completion."""
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


class Training:
    """``scripts/train.py`` in the background; a thread collects its stdout line by line."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_path: Path):
        self._stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")  # a file: a full stderr pipe would block it
        self.proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(self.lines[-1])
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT_S) -> re.Match:
        """Blocks until a stdout line matches ``pattern`` (``re.search``); returns the match."""
        regex = re.compile(pattern)
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n"
                                     + "\n".join(self.lines[-20:])) from None
            if line is None:
                result = self.finish()
                raise AssertionError(f"the run ended before printing {pattern!r}:\n"
                                     + result.describe())
            match = regex.search(line)
            if match:
                return match

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def finish(self, timeout: float = TIMEOUT_S) -> Result:
        """Waits for the process to exit; its whole output."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        self._reader.join(timeout=10)
        self._stderr.close()
        return Result(self.proc.returncode, "\n".join(self.lines) + "\n",
                      self._stderr_path.read_text())


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` (or ``path`` itself) with its sha256 and mode."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": _digest(path)}
    entries = {}
    for item in sorted(path.rglob("*")):
        name = str(item.relative_to(path))
        entries[name] = _digest(item) if item.is_file() else f"dir {item.stat().st_mode:o}"
    return entries


def _digest(path: Path) -> str:
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"


def checkpoint_steps(workdir: Path) -> list[int]:
    """Complete checkpoint steps (folders named by a number) in ``workdir/checkpoints``."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if \
        folder.is_dir() else []


def restored_state(workdir: Path, step: int | None = None) -> dict:
    """The full train state (params, optimizer state, counters) of a checkpoint, as numpy."""
    workdir = Path(workdir)
    config = read_config(workdir)
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    _, state = steps.init_state(config, tx)
    with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
        restored, _ = ckpt.restore(ckpt.latest_step() if step is None else step, state)
    return jax.tree.map(np.asarray, restored)


def assert_states_equal(expected: dict, got: dict) -> None:
    """Bitwise equality, leaf by leaf, naming the first leaf that differs."""
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in expected_leaves] == [p for p, _ in got_leaves]
    for (path, a), (_, b) in zip(expected_leaves, got_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), \
            f"{jax.tree_util.keystr(path)} differs: max |diff| {np.max(np.abs(a - b))}"
