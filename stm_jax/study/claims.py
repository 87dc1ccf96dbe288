"""The paper's claims, its figures, and the stated criteria that turn our numbers into verdicts.

Every function takes summary statistics ``{"mean", "std", "n"}`` (std over seeds, ddof = 1,
None for one seed) and returns a dict with the measured value, the paper's, the criterion in
words and the verdict, one of ``VERDICTS``. "Within seed noise" means the difference is at
most ``NOISE_Z`` standard errors of a difference of two means, sqrt(s_a^2/n_a + s_b^2/n_b).
"Beyond seed noise" needs that spread: with one seed a claim that asks for it is at most partly
reproduced.
"""

from __future__ import annotations

import math

VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not run")
# The paper's figures (character-level GPT; its own data and scale).
PAPER = {
    "ce_clean_bpc": 2.122,
    "margin_clean_bpc": 2.158,
    "clean_cost": 0.017,  # relative: (2.158 - 2.122) / 2.122
    "accuracy_gain_points": 12.0,  # barrier minus CE-only, top-1, at sigma = 0.5
    "best_lambda_m": 0.02,
}
SIGMA = 0.5
NOISE_MODE = "absolute"  # Gaussian noise of scale sigma on the layer-0 embedding, as the paper
NOISE_Z = 2.0
CLEAN_COST_REPRODUCED = 0.035  # about 2x the paper's +1.7%
CLEAN_COST_PARTLY = 0.07
GAIN_REPRODUCED_POINTS = 6.0  # half the paper's +12 points


def difference(a: dict | None, b: dict | None) -> dict:
    """b - a, its standard error (None below two seeds each) and whether it is within noise."""
    diff = b["mean"] - a["mean"]
    if a["std"] is None or b["std"] is None:
        return {"difference": diff, "standard_error": None, "within_seed_noise": None}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"difference": diff, "standard_error": se,
            "within_seed_noise": abs(diff) <= NOISE_Z * se}


def _not_run(claim: str, criterion: str, needs: str, paper: float | None) -> dict:
    return {"claim": claim, "criterion": criterion, "verdict": "not run",
            "measured": None, "paper": paper, "note": f"needs {needs}"}


def _usable(*stats) -> bool:
    return all(s is not None and s.get("mean") is not None and math.isfinite(s["mean"])
               for s in stats)


def clean_cost(ce_bpc: dict | None, barrier_bpc: dict | None) -> dict:
    """Relative clean-BPC cost of the barrier: (barrier - CE) / CE."""
    criterion = (f"relative cost <= {CLEAN_COST_REPRODUCED:.1%}: reproduced; <= "
                 f"{CLEAN_COST_PARTLY:.0%}: partly; above: not reproduced (paper "
                 f"+{PAPER['clean_cost']:.1%})")
    if not _usable(ce_bpc, barrier_bpc):
        return _not_run("clean_cost", criterion, "the ce and margin_0.02 runs",
                        PAPER["clean_cost"])
    relative = (barrier_bpc["mean"] - ce_bpc["mean"]) / ce_bpc["mean"]
    verdict = ("reproduced" if relative <= CLEAN_COST_REPRODUCED else
               "partly reproduced" if relative <= CLEAN_COST_PARTLY else "not reproduced")
    return {"claim": "clean_cost", "criterion": criterion, "verdict": verdict,
            "measured": relative, "paper": PAPER["clean_cost"], **difference(ce_bpc, barrier_bpc)}


def robustness_gain(ce_accuracy: dict | None, barrier_accuracy: dict | None) -> dict:
    """Top-1 accuracy points gained by the barrier under noise (sigma = 0.5)."""
    criterion = (f"gain >= {GAIN_REPRODUCED_POINTS:g} points and beyond seed noise: "
                 "reproduced; positive: partly; zero or negative: not reproduced (paper "
                 f"+{PAPER['accuracy_gain_points']:g} points)")
    if not _usable(ce_accuracy, barrier_accuracy):
        return _not_run("robustness", criterion, "the ce and margin_0.02 runs",
                        PAPER["accuracy_gain_points"])
    spread = difference(ce_accuracy, barrier_accuracy)
    points = 100.0 * spread["difference"]
    large = points >= GAIN_REPRODUCED_POINTS and spread["within_seed_noise"] is False
    verdict = ("reproduced" if large else "partly reproduced" if points > 0
               else "not reproduced")
    return {"claim": "robustness", "criterion": criterion, "verdict": verdict,
            "measured": points, "paper": PAPER["accuracy_gain_points"], **spread}


def lambda_optimum(noisy_bpc_by_lambda: dict[float, dict]) -> dict:
    """Which lambda_m of the sweep minimises BPC under noise; the paper's is 0.02."""
    best_paper = PAPER["best_lambda_m"]
    criterion = (f"argmin = {best_paper:g}: reproduced; a grid neighbour of {best_paper:g}, or "
                 f"{best_paper:g} within seed noise of the minimum: partly; else not reproduced")
    sweep = {lam: s for lam, s in noisy_bpc_by_lambda.items() if _usable(s)}
    if len(sweep) < 2 or best_paper not in sweep:
        return _not_run("lambda_optimum", criterion, f"two or more sweep runs, {best_paper:g} "
                        "among them", best_paper)
    grid = sorted(sweep)
    best = min(grid, key=lambda lam: sweep[lam]["mean"])
    neighbour = abs(grid.index(best) - grid.index(best_paper)) == 1
    spread = difference(sweep[best], sweep[best_paper])
    verdict = ("reproduced" if best == best_paper else
               "partly reproduced" if neighbour or spread["within_seed_noise"]
               else "not reproduced")
    return {"claim": "lambda_optimum", "criterion": criterion, "verdict": verdict,
            "measured": best, "paper": best_paper, **spread}


def margin_geometry(ce_q05: dict | None, barrier_q05: dict | None,
                    ce_infeasible: dict | None, barrier_infeasible: dict | None) -> dict:
    """The barrier keeps tokens away from degeneracy: higher low margins, no more infeasible."""
    criterion = ("the worst layer's 5% margin quantile higher than CE-only beyond seed noise "
                 "AND the infeasible fraction not higher: reproduced; one of the two: partly; "
                 "neither: not reproduced (the paper gives no figure)")
    if not _usable(ce_q05, barrier_q05, ce_infeasible, barrier_infeasible):
        return _not_run("margin_geometry", criterion, "the ce and margin_0.02 runs", None)
    spread = difference(ce_q05, barrier_q05)
    raised = spread["difference"] > 0 and spread["within_seed_noise"] is False
    no_more_infeasible = barrier_infeasible["mean"] <= ce_infeasible["mean"]
    verdict = ("reproduced" if raised and no_more_infeasible else
               "partly reproduced" if raised or no_more_infeasible else "not reproduced")
    return {"claim": "margin_geometry", "criterion": criterion, "verdict": verdict,
            "measured": spread["difference"], "paper": None,
            "infeasible_difference": barrier_infeasible["mean"] - ce_infeasible["mean"],
            **spread}


# ---------------------------------------------------------------------------------------------
# The readings study: does a reading recover the robustness claim?

READING_VERDICTS = ("recovers", "partly", "explained by its control", "does not recover",
                    "screened (one seed)")
READING_CRITERION = (
    f"recovers: a top-1 gain over CE-only of at least {GAIN_REPRODUCED_POINTS:g} points beyond "
    f"{NOISE_Z:g} standard errors at sigma = {SIGMA:g}, a clean cost of at most "
    f"{CLEAN_COST_REPRODUCED:.1%}, and a gain over its control of the same size (the control "
    "does not explain it); partly: a gain over CE-only beyond seed noise, short of that, and "
    "over its control too; explained by its control: a gain over CE-only beyond seed noise but "
    "none over its control; does not recover: no gain beyond seed noise; screened: fewer than "
    "two seeds of the run, CE-only or the control")


def reading_verdict(ce_bpc: dict | None, reading_bpc: dict | None, ce_accuracy: dict | None,
                    reading_accuracy: dict | None, control_accuracy: dict | None,
                    control_is_ce: bool) -> dict:
    """The verdict on one reading's run under one noise mode (``READING_CRITERION``).

    Accuracies are top-1 at sigma = ``SIGMA``; the control is the run that does what the
    reading does besides its barrier (CE-only itself for most).
    """
    if not _usable(ce_bpc, reading_bpc, ce_accuracy, reading_accuracy, control_accuracy):
        return {"verdict": "not run", "criterion": READING_CRITERION}
    cost = (reading_bpc["mean"] - ce_bpc["mean"]) / ce_bpc["mean"]
    gain = difference(ce_accuracy, reading_accuracy)
    over_control = difference(control_accuracy, reading_accuracy)
    points, control_points = 100 * gain["difference"], 100 * over_control["difference"]
    result = {"criterion": READING_CRITERION, "clean_cost": cost, "gain_points": points,
              "gain_se_points": None if gain["standard_error"] is None
              else 100 * gain["standard_error"], "gain_beyond_noise": gain["within_seed_noise"]
              is False, "gain_over_control_points": control_points,
              "control_se_points": None if over_control["standard_error"] is None
              else 100 * over_control["standard_error"]}
    if gain["within_seed_noise"] is None or over_control["within_seed_noise"] is None:
        return {**result, "verdict": "screened (one seed)"}
    large = points >= GAIN_REPRODUCED_POINTS and result["gain_beyond_noise"]
    beats_control = control_is_ce or (control_points >= GAIN_REPRODUCED_POINTS
                                      and over_control["within_seed_noise"] is False)
    if large and beats_control and cost <= CLEAN_COST_REPRODUCED:
        return {**result, "verdict": "recovers"}
    if result["gain_beyond_noise"] and points > 0:
        explained = not control_is_ce and not (control_points > 0
                                               and over_control["within_seed_noise"] is False)
        return {**result, "verdict": "explained by its control" if explained else "partly"}
    return {**result, "verdict": "does not recover"}


def quality_matched_gain(curve: list[tuple[float, float]], bpc: float | None,
                         accuracy: float | None) -> float | None:
    """Top-1 points above the CE-only quality curve at the same clean BPC: ``curve`` is
    (clean BPC, top-1 under noise) of CE checkpoints; interpolated linearly in BPC, None
    outside the curve's range (no extrapolation)."""
    if bpc is None or accuracy is None or len(curve) < 2:
        return None
    points = sorted(curve)
    bpcs = [point[0] for point in points]
    if not bpcs[0] <= bpc <= bpcs[-1]:
        return None
    for (low_bpc, low_acc), (high_bpc, high_acc) in zip(points, points[1:], strict=False):
        if low_bpc <= bpc <= high_bpc:
            share = 0.0 if high_bpc == low_bpc else (bpc - low_bpc) / (high_bpc - low_bpc)
            return 100 * (accuracy - (low_acc + share * (high_acc - low_acc)))
    return None
