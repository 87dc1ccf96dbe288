"""Training and evaluating a study's runs as subprocesses, ``jobs`` at a time, resumably.

Each (run, seed) goes through ``scripts/train.py`` then ``scripts/evaluate.py``, their output
appended to ``train.log`` and ``eval.log`` in its workdir. What is already on disk decides what
is left to do (``plan.run_state``): an evaluated run is skipped, a trained one only
evaluated, anything else (re)launched with the same command, which resumes from its checkpoint.
A failed run is reported with the end of its log; the others go on.

Ctrl-C or SIGTERM: the running trainings are sent SIGTERM (each saves its step and exits), the
runs not started are dropped, and ``KeyboardInterrupt`` is raised once they have stopped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stm_jax import files
from stm_jax.evaluation import RESULTS_FILE
from stm_jax.study.plan import RunPlan, evaluated_step, missing_curve, run_state, shell_line
from stm_jax.trainer.metrics import format_duration

TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
TAIL_LINES = 15


@dataclasses.dataclass(frozen=True)
class Outcome:
    plan: RunPlan
    status: str  # "skipped", "evaluated" (trained before), "trained" (and evaluated), "failed"
    seconds: float
    detail: str
    log_path: Path | None = None  # the log whose end explains a failure


class _Children:
    """The running subprocesses, so an interrupt can ask each to save and stop."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, command: tuple[str, ...], log_path: Path, env: dict[str, str]) -> int | None:
        """Runs ``python command`` with its output appended to ``log_path``; None if stopping."""
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_line(command)}\n")
            log.flush()
            with self._lock:
                if self.stopping.is_set():
                    return None
                # Its own session: a terminal's Ctrl-C reaches only this process, which then
                # sends one SIGTERM (a second signal would make train.py exit without saving).
                proc = subprocess.Popen([sys.executable, *command], stdout=log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                self._procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _validation_bpc(plan: RunPlan) -> str:
    results = files.read_json_or_none(plan.workdir / RESULTS_FILE)
    try:
        return f"val BPC {results['splits']['validation']['clean']['bpc']:.4f}"
    except (KeyError, TypeError):
        return "no validation BPC"


def process(plan: RunPlan, children: _Children, env: dict[str, str]) -> Outcome:
    """Brings one (run, seed) to "evaluated", doing only what its workdir still lacks."""
    start = time.perf_counter()
    state = run_state(plan)
    if state == "evaluated":
        return Outcome(plan, "skipped", 0.0, f"skipped: already evaluated at step "
                       f"{plan.num_steps} ({_validation_bpc(plan)})")

    def failed(what: str, log: str) -> Outcome:
        return Outcome(plan, "failed", time.perf_counter() - start, what, plan.workdir / log)

    plan.workdir.mkdir(parents=True, exist_ok=True)
    if state == "pending":
        code = children.run(plan.train_command, plan.workdir / TRAIN_LOG, env)
        if code is None:
            return failed("not started: interrupted", TRAIN_LOG)
        if code:
            return failed(f"train.py exited with code {code}", TRAIN_LOG)
        if run_state(plan) != "trained":
            return failed(f"train.py stopped before step {plan.num_steps} (interrupted); "
                          "rerun the same command to resume", TRAIN_LOG)
    commands = [] if evaluated_step(plan) == plan.num_steps else [plan.eval_command]
    commands += [command for _, command in missing_curve(plan)]
    for command in commands:
        code = children.run(command, plan.workdir / EVAL_LOG, env)
        if code is None:
            return failed("not evaluated: interrupted", EVAL_LOG)
        if code:
            return failed(f"evaluate.py exited with code {code} ({shell_line(command)})",
                          EVAL_LOG)
    if run_state(plan) != "evaluated":
        return failed(f"evaluate.py wrote no results for step {plan.num_steps}", EVAL_LOG)
    done = "trained and evaluated" if state == "pending" else "evaluated (already trained)"
    return Outcome(plan, "trained" if state == "pending" else "evaluated",
                   time.perf_counter() - start, f"{done}: {_validation_bpc(plan)}")


def progress_line(index: int, total: int, outcome: Outcome, elapsed_s: float) -> str:
    """``[i/N] run/seedK: what happened | run time, elapsed``, and a failure's log tail."""
    failed = "FAILED: " if outcome.status == "failed" else ""
    line = (f"[{index}/{total}] {outcome.plan.label}: {failed}{outcome.detail} | run "
            f"{format_duration(outcome.seconds)}, elapsed {format_duration(elapsed_s)}")
    if outcome.status == "failed" and outcome.log_path is not None:
        tail = log_tail(outcome.log_path).splitlines()
        line += f"\n    last lines of {outcome.log_path}:" + "".join(f"\n    | {t}" for t in tail)
    return line


def run_all(plans: list[RunPlan], *, jobs: int, echo: Callable[[str], None],
            env: dict[str, str] | None = None) -> list[Outcome]:
    """Every plan, ``jobs`` at a time; one progress line per run as it finishes."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    children, outcomes, start = _Children(), [], time.perf_counter()
    previous = _raise_interrupt_on_sigterm()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(process, plan, children, env) for plan in plans]
        for future in concurrent.futures.as_completed(futures):
            outcomes.append(future.result())
            echo(progress_line(len(outcomes), len(plans), outcomes[-1],
                               time.perf_counter() - start))
    except KeyboardInterrupt:
        echo("interrupted: asking the running trainings to save their checkpoints ...")
        children.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    order = {plan.label: index for index, plan in enumerate(plans)}
    return sorted(outcomes, key=lambda outcome: order[outcome.plan.label])


def _raise_interrupt_on_sigterm():
    """A SIGTERM to this process stops the study like Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)
