"""Where a compiled training step spends its time, operation by operation.

``scripts/profile_step.py`` traces a few steps with ``jax.profiler`` and reads the trace's
per-operation events back. Each event is one executed XLA instruction of the step's program,
named as in ``program.as_text()``; an instruction's *kind* is its name without the numeric
suffix (``dot``, ``lu``, ``triangular_solve``, ``while``, ``copy_bitcast_fusion``), and its
*source* is the JAX operation it was lowered from (the ``op_name`` metadata, with the
``jit(...)``, ``vmap(...)`` and ``jvp(...)`` wrappers dropped and ``T:`` marking the backward
pass). Times are self times: a loop's own overhead, its body's instructions counted apart.
Operations on two threads overlap, so their times add up to more than the step's wall time.

Pure functions of the program text and the trace events, so that they are tested without a
profiler.
"""

from __future__ import annotations

import collections
import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WRAPPER = re.compile(r"^(transpose|jvp|vmap|checkpoint|remat|jit|pjit)\(")
_PLUMBING = {"while", "body", "cond", "closed_call", "checkpoint", "remat"}


def instructions(hlo_text: str) -> dict[str, dict]:
    """Every instruction of the program text, with its kind and source:
    {name: {"kind": ..., "source": ...}}."""
    return {match.group(1): {"kind": kind_of(match.group(1)), "source": source_of(line)}
            for line in hlo_text.splitlines() for match in [_INSTRUCTION.match(line)] if match}


def kind_of(name: str) -> str:
    """``copy_bitcast_fusion.12`` -> ``copy_bitcast_fusion``."""
    return re.sub(r"(\.\d+)+$", "", name)


def source_of(line: str) -> str:
    """The JAX operation an instruction came from, ``T:`` marking the backward pass:
    ``jit(train_step)/while/body/transpose(jvp(vmap(td,dhp->htp)))/dot_general`` ->
    ``T:td,dhp->htp/dot_general``."""
    match = _OP_NAME.search(line)
    if not match:
        return "(no source)"
    segments = match.group(1).split("/")
    if segments[0].startswith("jit("):
        segments = segments[1:]  # the program itself
    backward, kept = False, []
    for segment in segments:
        if segment in _PLUMBING:
            continue
        while (wrapper := _WRAPPER.match(segment)) and segment.endswith(")"):
            backward |= wrapper.group(1) == "transpose"
            segment = segment[wrapper.end():-1]
        if segment:
            kept.append(segment)
    return ("T:" if backward else "") + ("/".join(kept) or "(unnamed)")


def step_times(events: list[dict], table: dict[str, dict], steps: int) -> dict[str, float]:
    """Milliseconds per step of each instruction in ``table``, from Chrome-trace events
    (``ph == "X"``, ``ts`` and ``dur`` in microseconds) over ``steps`` steps.

    Self time: an event's duration less that of the instruction events nested in it on the
    same thread, so that a loop counts its own overhead and its body's instructions count
    theirs, once.
    """
    ours = [event for event in events if event.get("ph") == "X" and event.get("name") in table]
    totals = collections.Counter()
    by_thread = collections.defaultdict(list)
    for event in ours:
        by_thread[(event.get("pid"), event.get("tid"))].append(event)
    for thread_events in by_thread.values():
        open_events: list[dict] = []  # the enclosing events, innermost last
        for event in sorted(thread_events, key=lambda e: (e["ts"], -e["dur"])):
            while open_events and open_events[-1]["ts"] + open_events[-1]["dur"] <= event["ts"]:
                open_events.pop()
            totals[event["name"]] += event["dur"]
            if open_events:
                totals[open_events[-1]["name"]] -= event["dur"]
            open_events.append(event)
    return {name: total / 1e3 / steps for name, total in totals.items()}


def grouped(times: dict[str, float], table: dict[str, dict], by: str) -> dict[str, float]:
    """``times`` summed by instruction ``by`` ("kind" or "source")."""
    totals = collections.Counter()
    for name, ms in times.items():
        totals[table[name][by]] += ms
    return dict(totals)


def difference(mode: dict[str, float], base: dict[str, float]) -> list[tuple[str, float]]:
    """(group, mode - base) for every group, largest increase first."""
    return sorted(((key, mode.get(key, 0.0) - base.get(key, 0.0)) for key in {*mode, *base}),
                  key=lambda item: -item[1])
