"""The step profiler: instructions, their kinds and sources read from program text, and trace
events summed per step (``stm_jax/bench/profile.py``, ``scripts/profile_step.py``)."""

import subprocess
import sys
from pathlib import Path

import pytest

from stm_jax.bench import profile

ROOT = Path(__file__).resolve().parents[1]


def _meta(op_name: str) -> str:
    return f'metadata={{op_name="jit(train_step)/{op_name}"}}'


PROGRAM = "\n".join([
    "HloModule jit_train_step",
    "%body.7 (param: (s32[], f32[4])) -> (s32[], f32[4]) {",
    f"  %inner_add.3 = f32[4]{{0}} add(f32[4]{{0}} %a, f32[4]{{0}} %b), {_meta('while/body/add')}",
    "  ROOT %tuple.9 = (s32[], f32[4]) tuple(s32[] %i, f32[4]{0} %inner_add.3)",
    "}",
    "%cond.8 (param: (s32[], f32[4])) -> pred[] {",
    "  ROOT %compare.2 = pred[] compare(s32[] %i, s32[] %n), direction=LT",
    "}",
    "ENTRY %main.20 (p0: f32[4,4]) -> f32[4,4] {",
    "  %dot.12 = f32[4,4]{1,0} dot(f32[4,4]{1,0} %p0, f32[4,4]{1,0} %p0), "
    + _meta("while/body/closed_call/transpose(jvp(vmap(td,dhp->htp)))/dot_general"),
    "  %dot.13 = f32[4,4]{1,0} dot(f32[4,4]{1,0} %p0, f32[4,4]{1,0} %dot.12), "
    + _meta("jvp(vmap(td,dhp->htp))/dot_general"),
    '  %lu.5 = (f32[4,4]) custom-call(f32[4,4]{1,0} %dot.13), custom_call_target="lapack", '
    + _meta("jvp(vmap())/lu"),
    "  %while.6 = (s32[], f32[4]) while((s32[], f32[4]) %init), condition=%cond.8, "
    "body=%body.7",
    "  ROOT %copy_bitcast_fusion.2 = f32[4,4]{1,0} fusion(f32[4,4]{1,0} %dot.13), kind=kLoop, "
    "calls=%fused.1",
    "}",
])


def test_instructions_with_their_kinds_and_sources():
    table = profile.instructions(PROGRAM)
    assert set(table) == {"inner_add.3", "tuple.9", "compare.2", "dot.12", "dot.13", "lu.5",
                          "while.6", "copy_bitcast_fusion.2"}
    assert table["dot.12"] == {"kind": "dot", "source": "T:td,dhp->htp/dot_general"}
    assert table["dot.13"] == {"kind": "dot", "source": "td,dhp->htp/dot_general"}
    assert table["lu.5"] == {"kind": "lu", "source": "lu"}
    assert table["inner_add.3"] == {"kind": "inner_add", "source": "add"}
    assert table["copy_bitcast_fusion.2"] == {"kind": "copy_bitcast_fusion",
                                              "source": "(no source)"}


def _event(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def test_step_times_are_self_times_per_step():
    table = profile.instructions(PROGRAM)
    events = [
        _event("while.6", 0, 1000),  # its body's add and compare run inside it, same thread
        _event("inner_add.3", 100, 300),
        _event("compare.2", 500, 100),
        _event("dot.12", 2000, 300),
        _event("dot.12", 2500, 100, tid=2),  # another thread: not nested in anything
        _event("dot.13", 1200, 200, tid=2),
        _event("ThunkExecutor::Execute", 0, 5000),  # the runtime's own, not an instruction
        {"ph": "i", "name": "lu.5", "ts": 0, "dur": 50},  # not a complete event
    ]
    times = profile.step_times(events, table, steps=2)
    assert times == pytest.approx({"while.6": 0.3, "inner_add.3": 0.15, "compare.2": 0.05,
                                   "dot.12": 0.2, "dot.13": 0.1})
    by_kind = profile.grouped(times, table, "kind")
    assert by_kind == pytest.approx({"while": 0.3, "inner_add": 0.15, "compare": 0.05,
                                     "dot": 0.3})
    base = {"dot": 0.1, "fusion": 0.2}
    groups, extras = zip(*profile.difference(by_kind, base), strict=True)
    assert groups[:2] == ("while", "dot") and groups[-1] == "fusion"
    assert extras == pytest.approx((0.3, 0.2, 0.15, 0.05, -0.2))


def test_the_estimator_step_adds_determinant_work(tmp_path):
    """On a real trace: the barrier's step has LU factorisations that CE-only has not."""
    done = subprocess.run([sys.executable, "scripts/profile_step.py", "--config=tiny",
                           "--mode=head_estimator", "--steps=2", "--top=40"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    by_kind = done.stdout.split("milliseconds per step by kind")[1].split("by source")[0]
    lu_rows = [line.split() for line in by_kind.splitlines() if line.endswith(" lu")]
    assert len(lu_rows) == 1
    extra, mode_ms, ce_ms = map(float, lu_rows[0][:3])
    assert mode_ms > 0 and ce_ms == 0 and extra == mode_ms


def test_an_unknown_mode_is_one_error_line():
    done = subprocess.run([sys.executable, "scripts/profile_step.py", "--mode=nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --mode=nope") and "\n" not in done.stderr.strip()
