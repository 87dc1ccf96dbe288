"""The benchmark's markdown: every measurement, the estimator's spread, the determinants
alone, one barrier evaluation, and the targets with what was measured next to each.

Pure formatting of the dict ``scripts/benchmark.py`` writes as ``benchmark.json``.
"""

from __future__ import annotations

import platform
from pathlib import Path

import jax

from stm_jax import files
from stm_jax.bench.benchmark import ESTIMATOR_MODES, PEER_MODE


def machine(detail: str = "") -> str:
    """``Machine: x86_64, 1 x cpu, <detail>, jax 0.9.2``: where a benchmark ran."""
    return (f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
            f"{jax.devices()[0].device_kind}{', ' + detail if detail else ''}, jax "
            f"{jax.__version__}")


def write(out: str | Path, result: dict, markdown: str) -> None:
    """``benchmark.md`` and ``benchmark.json`` in ``out``, and the markdown on stdout."""
    files.write_text(Path(out) / "benchmark.md", markdown)
    files.write_json(Path(out) / "benchmark.json", result, indent=2)
    print("\n" + markdown, flush=True)


def format_table(rows: list[dict]) -> str:
    """Markdown table of every measurement."""
    header = ("| config | mode | microbatches | step ms | tokens/s | x CE time (quartiles) | "
              "peak MB | x CE memory | MFU | barrier floor ms | overhead / floor | compile s |")
    lines = [header, "|" + "---|" * 12]
    number = lambda r, key, form: "-" if r.get(key) is None else format(r[key], form)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['config']} | {r['mode']} | {r.get('microbatches', 1)} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {_ratio_text(r)} | "
                     f"{number(r, 'peak_memory_mb', '.0f')} | "
                     f"{number(r, 'memory_vs_ce', '.2f')} | {100 * r['mfu']:.1f}% | "
                     f"{number(r, 'floor_ms', '.1f')} | {number(r, 'overhead_vs_floor', '.2f')} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def _ratio_text(row: dict) -> str:
    """The paired ratio to CE with its quartiles over rounds, "1.27 (1.24-1.30)"."""
    quartiles = row.get("step_vs_ce_quartiles")
    if not quartiles or row["mode"] == "ce":
        return f"{row['step_vs_ce']:.2f}"
    return f"{row['step_vs_ce']:.2f} ({quartiles[0]:.2f}-{quartiles[1]:.2f})"


def _fraction_text(fraction: float) -> str:
    """0.03125 -> "1/32", 1 -> "all"; fractions that are not one over a whole number as they
    are."""
    inverse = 1 / fraction
    if abs(inverse - round(inverse)) >= 1e-9:
        return f"{fraction:g}"
    return "all" if round(inverse) == 1 else f"1/{round(inverse)}"


def targets_table(rows: list[dict], *, peer_tokens_per_s: float) -> list[dict]:
    """The issue's targets, each with the measured value next to it and whether it is met."""
    by = {(r["config"], r["mode"]): r for r in rows}
    targets = []

    def add(name, measured, goal, met, decided=True):
        targets.append({"target": name, "measured": measured, "goal": goal, "met": bool(met),
                        "decided": bool(decided)})

    def add_ratio(name, row, goal: float):
        """A step-time ratio against ``goal``, decided when the median's interval lies on one
        side of it (``benchmark.median_interval``)."""
        ratio, interval = row["step_vs_ce"], row.get("step_vs_ce_interval")
        measured = f"{ratio:.2f}x"
        if interval:
            measured += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        decided = not interval or interval[1] <= goal or interval[0] > goal
        add(name, measured, f"<= {goal}x", ratio <= goal, decided)

    for config in dict.fromkeys(r["config"] for r in rows):
        for mode in ("head", "head_chunked"):
            if (config, mode) in by:
                r = by[(config, mode)]
                add(f"{config}: {mode} barrier peak memory / CE", f"{r['memory_vs_ce']:.2f}x",
                    "<= 1.5x", r["memory_vs_ce"] <= 1.5)
                add(f"{config}: {mode} barrier overhead / arithmetic floor",
                    f"{r['overhead_vs_floor']:.2f}x", "<= 1.3x", r["overhead_vs_floor"] <= 1.3)
        for mode in ESTIMATOR_MODES:
            if (config, mode) in by:
                r = by[(config, mode)]
                penalty = mode.removesuffix("_estimator")
                name = "" if mode.startswith("head_") else f"{penalty} "
                positions = (f"{name}estimator on {_fraction_text(r['position_fraction'])} "
                             "of positions")
                what = (f"{positions}, step time" if "step_fraction" not in r else
                        f"{positions} and {_fraction_text(r['step_fraction'])} of steps, "
                        "mean step time")
                add_ratio(f"{config}: {what} / CE", r, 1.3)
        if (config, "prior_p8") in by:
            add_ratio(f"{config}: embedding prior (prior_dim 8), step time / CE",
                      by[(config, "prior_p8")], 1.1)
        if (config, "ce") in by and (config, PEER_MODE) in by:
            r, peer = by[(config, "ce")], by[(config, PEER_MODE)]
            add(f"{config}: CE-only tokens/s vs nanoGPT ({peer['description']}), same run",
                f"{r['tokens_per_s']:,.0f}", f">= {peer['tokens_per_s']:,.0f}",
                r["tokens_per_s"] >= peer["tokens_per_s"])
        elif config.startswith("shakespeare_char:cpu") and (config, "ce") in by:
            r = by[(config, "ce")]
            add(f"{config}: CE-only tokens/s (nanoGPT eager CPU ~{peer_tokens_per_s:,.0f})",
                f"{r['tokens_per_s']:,.0f}", f">= {peer_tokens_per_s:,.0f}",
                r["tokens_per_s"] >= peer_tokens_per_s)
    return targets


def targets_markdown(targets: list[dict]) -> str:
    """The targets as a table; a ratio's "measured" has the 95% interval of its median, and a
    verdict the interval does not decide says "within noise"."""
    lines = ["| target | measured (median's 95% interval) | goal | met |", "|---|---|---|---|"]
    for t in targets:
        verdict = ("yes" if t["met"] else "NO") + ("" if t["decided"] else " (within noise)")
        lines.append(f"| {t['target']} | {t['measured']} | {t['goal']} | {verdict} |")
    return "\n".join(lines)


def _spread_table(spreads: list[dict]) -> str:
    lines = ["| config | fraction | positions drawn | exact barrier | estimator mean | std | "
             "relative std | relative std, on a fraction of steps |", "|---" * 8 + "|"]
    lines += [f"| {s['config']} | {s['fraction']} | {s['sampling'].replace('_', ' ')} | "
              f"{s['exact']:.5f} | {s['mean']:.5f} | {s['std']:.5f} | "
              f"{s['relative_std']:.3f} | {s['lazy_relative_std']:.3f} "
              f"(q = {s['step_fraction']:g}) |" for s in spreads]
    return "\n".join(lines)


def _determinants_table(determinants: list[dict]) -> str:
    lines = ["| config | p x p blocks per step | slogdet forward + gradient | "
             "whole barrier's arithmetic floor | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['blocks']:,} of {r['block_size']} x {r['block_size']} | "
              f"{r['ms']:.1f} ms | {r['barrier_floor_ms']:.1f} ms | "
              f"{r['determinants_vs_floor']:.2f}x |" for r in determinants]
    return "\n".join(lines)


def _single_table(single: list[dict]) -> str:
    lines = ["| scope | pass | ms | XLA temporary MB |", "|---|---|---|---|"]
    lines += [f"| {r['scope']} | {r['pass']} | {r['ms']:.1f} | {r['temp_mb']:.1f} |"
              for r in single]
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """``benchmark.md`` from the measurements (``result["targets"]`` already evaluated)."""
    sections = [result["machine"], "## Measurements", format_table(result["rows"])]
    if result["estimator"]:
        sections += ["## Barrier estimator spread (32 draws, initial parameters)",
                     _spread_table(result["estimator"])]
    if result["determinants"]:
        sections += ["## The exact head barrier's determinants alone (LAPACK LU and two "
                     "triangular solves per block)", _determinants_table(result["determinants"])]
    if result["single_barrier"]:
        sections += ["## One barrier evaluation (one sequence and layer, T=256, d=384, H=6, "
                     "float32)", _single_table(result["single_barrier"])]
    sections += ["## Targets", targets_markdown(result["targets"])]
    return "\n\n".join(sections) + "\n"
