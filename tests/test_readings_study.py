"""The readings study's verdicts, quality curve, plans and report, from stated criteria.

Pure functions on summary statistics, and one summary built from synthetic run folders (the
files a trained and evaluated run leaves), so no training is needed.
"""

import json
from pathlib import Path

import pytest

from stm_jax.study import claims, experiments, plots, report
from stm_jax.study import plan as run_plan
from stm_jax.study.summary import build_summary

ROOT = Path(__file__).resolve().parents[1]


def stat(mean, std=None, n=1):
    return {"mean": mean, "std": std, "n": n}


def verdict(gain, control_gain=None, cost=0.01, std=0.01, n=3):
    """A reading with top-1 ``gain`` over CE (and ``control_gain`` over its control)."""
    ce_bpc, ce_acc = stat(2.0, 0.01, n), stat(0.30, std, n)
    control = ce_acc if control_gain is None else stat(0.30 + gain - control_gain, std, n)
    return claims.reading_verdict(ce_bpc, stat(2.0 * (1 + cost), 0.01, n), ce_acc,
                                  stat(0.30 + gain, std, n), control, control_gain is None)


def test_reading_verdicts_follow_the_criterion():
    assert verdict(0.10)["verdict"] == "recovers"
    assert verdict(0.10)["gain_points"] == pytest.approx(10.0)
    assert verdict(0.10, cost=0.05)["verdict"] == "partly"  # too costly when clean
    assert verdict(0.04)["verdict"] == "partly"  # beyond noise, short of 6 points
    assert verdict(0.10, control_gain=0.03)["verdict"] == "partly"  # beats its control a little
    assert verdict(0.10, control_gain=0.0)["verdict"] == "explained by its control"
    assert verdict(0.10, control_gain=-0.03)["verdict"] == "explained by its control"
    assert verdict(0.10, control_gain=0.08)["verdict"] == "recovers"
    assert verdict(0.10, std=0.2)["verdict"] == "does not recover"  # within seed noise
    assert verdict(-0.05)["verdict"] == "does not recover"
    assert verdict(0.10, n=1, std=None)["verdict"] == "screened (one seed)"
    missing = claims.reading_verdict(None, stat(2.0), None, stat(0.3), None, True)
    assert missing["verdict"] == "not run"


def test_quality_matched_gain_interpolates_the_ce_curve():
    curve = [(3.0, 0.10), (2.8, 0.20), (2.6, 0.30)]  # (clean BPC, top-1 under noise)
    assert claims.quality_matched_gain(curve, 2.7, 0.30) == pytest.approx(5.0)
    assert claims.quality_matched_gain(curve, 2.6, 0.30) == pytest.approx(0.0)
    assert claims.quality_matched_gain(curve, 2.5, 0.40) is None  # no extrapolation
    assert claims.quality_matched_gain(curve[:1], 3.0, 0.1) is None


def test_the_ce_run_of_the_readings_study_plans_its_quality_curve(tmp_path):
    experiment = experiments.get_experiment("readings_shakespeare")
    plans = run_plan.plan_runs(experiment, experiments.select_runs(experiment, ["ce", "ce_noise"]),
                               1, [], data_root="d", experiment_dir=tmp_path, repo_root=ROOT)
    ce, ce_noise = plans
    assert [step for step, _ in ce.curve] == list(range(250, 2000, 250)) and not ce_noise.curve
    step, command = ce.curve[0]
    assert "--step=250" in command and "--output_tag=step250" in command
    assert "--sigmas=0,0.5" in command and ce.config["keep_checkpoints"] == 8
    # Evaluated at the last step but not along the curve: not done yet.
    ce.workdir.mkdir(parents=True)
    (ce.workdir / "eval_results.json").write_text(json.dumps({"step": 2000}))
    assert run_plan.run_state(ce) != "evaluated"
    assert [s for s, _ in run_plan.missing_curve(ce)] == list(range(250, 2000, 250))
    for s in range(250, 2000, 250):
        (ce.workdir / run_plan.curve_file(s)).write_text(json.dumps({"step": s}))
    assert run_plan.run_state(ce) == "evaluated"


def eval_results(step, bpc, absolute, relative, rms=0.1, noise_gain=(1.5, 2.0)):
    """The parts of an eval_results.json the readings study reads, for one seed."""
    def rows(top1):
        return [{"sigma": 0.0, "bpc": bpc, "accuracy": 0.5},
                {"sigma": 0.5, "bpc": bpc + 1, "accuracy": top1, "sigma_in_rms": 0.5 / rms}]
    layers = [{"layer": i, "margin_min": 0.5, "margin_q05": 0.6, "infeasible_fraction": 0.0,
               "support_threshold_count": 0, "noise_gain": gain,
               "spectrum": {"spectral_radius_quantiles": {"q50": 0.3},
                            "fraction_real_above_one": 0.0}}
              for i, gain in enumerate(noise_gain)]
    return {"step": step,
            "splits": {"validation": {"clean": {"bpc": bpc, "accuracy": 0.5, "latent_rms": rms},
                                      "robustness": {"absolute": rows(absolute),
                                                     "relative": rows(relative)}}},
            "margins": {"layers": layers, "num_tokens": 10, "tau": 0.1, "bottom_k": 8,
                        "num_windows": 2}}


def write_run(experiment_dir, name, seed, bpc, absolute, relative, curve=()):
    folder = experiment_dir / "runs" / name / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "objective": {
        "lambda_m": 0.0 if name.startswith("ce") else 0.02}}))
    (folder / "train_summary.json").write_text(json.dumps({"status": "finished", "step": 2000}))
    (folder / "eval_results.json").write_text(json.dumps(
        eval_results(2000, bpc, absolute, relative)))
    for step, (curve_bpc, curve_abs, curve_rel) in curve:
        (folder / f"eval_results_step{step}.json").write_text(json.dumps(
            eval_results(step, curve_bpc, curve_abs, curve_rel)))


def test_summary_and_report_of_the_readings(tmp_path):
    """CE-only with its quality curve, latent noise and its control over three seeds: the
    barrier with noise gains 10 points over CE, but only 1 over CE with the same noise."""
    experiment = experiments.get_experiment("readings_shakespeare")
    directory = tmp_path / "readings_shakespeare"
    for seed in range(3):
        jitter = 0.002 * seed
        write_run(directory, "ce", seed, 2.70 + jitter, 0.10 + jitter, 0.30 + jitter,
                  curve=[(250, (3.5, 0.05, 0.15)), (1000, (2.9, 0.08, 0.25))])
        write_run(directory, "ce_noise", seed, 2.72 + jitter, 0.19 + jitter, 0.39 + jitter)
        write_run(directory, "margin_0.02_noise", seed, 2.75 + jitter, 0.20 + jitter,
                  0.40 + jitter)
    summary = build_summary(experiment, directory, [])
    assert [point["step"] for point in summary["ce_curve"]] == [250, 1000, 2000]
    assert summary["ce_curve"][-1]["val_bpc"] == pytest.approx(2.702)
    rows = {(row["run"], row["mode"]): row for row in summary["readings"]}
    noisy = rows["margin_0.02_noise", "absolute"]
    assert noisy["control"] == "ce_noise" and noisy["n"] == 3
    assert noisy["gain_points"] == pytest.approx(10.0)
    assert noisy["gain_over_control_points"] == pytest.approx(1.0)
    assert noisy["verdict"] == "partly"  # the noise, not the barrier, bought the gain
    # CE's curve at the run's clean BPC 2.752: between step 1000 (2.9, 8%) and the end
    # (2.702, 10.2%), 9.64% interpolated; the run has 20.2%.
    assert noisy["quality_matched_gain_points"] == pytest.approx(10.56, abs=0.01)
    text = report.format_report(summary, [], None)
    assert "## Readings: which, if any, recovers the robustness claim" in text
    assert "| latent_noise | margin_0.02_noise | 3 |" in text
    assert "## Mechanism: noise gain, self-map spectra, embedding scale" in text
    assert plots.plot_quality_curve(summary) is not None


def test_the_fraction_at_a_bounded_penaltys_constraint(tmp_path):
    """From training's last validation record in metrics.jsonl; '-' for a run without one."""
    experiment = experiments.get_experiment("readings_shakespeare")
    directory = tmp_path / "readings_shakespeare"
    write_run(directory, "ce", 0, 2.70, 0.10, 0.30)
    write_run(directory, "margin_hinge_l10", 0, 2.75, 0.10, 0.30)
    records = [{"step": 250, "split": "validation", "active_fraction": 0.5},
               {"step": 2000, "split": "train", "active_fraction": 0.9},
               {"step": 2000, "split": "validation", "active_fraction": 0.0125}]
    (directory / "runs" / "margin_hinge_l10" / "seed0" / "metrics.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in records))
    summary = build_summary(experiment, directory, [])
    metrics = {run["run"]: run["metrics"] for run in summary["runs"]}
    assert metrics["margin_hinge_l10"]["active_fraction"] == pytest.approx(0.0125)
    assert metrics["ce"]["active_fraction"] is None
    lines = report.format_report(summary, [], None).splitlines()
    hinge = next(line for line in lines if line.startswith("| margin_hinge_l10 | 1 | 0."))
    assert hinge.endswith("| 1.25% |")
    assert next(line for line in lines if line.startswith("| ce | 1 | 0.")).endswith("| - |")


def test_every_reading_switch_comes_through_an_override():
    """scripts/reproduce.py --override=key=value: each reading's keys, typed as the config."""
    from configs import shakespeare_char

    config = shakespeare_char.get_config("cpu,margin")
    typed = {"objective.barrier_target": ("embedding_prior", "embedding_prior"),
             "objective.prior_dim": ("8", 8), "objective.penalty": ("small_gain", "small_gain"),
             "objective.penalty_cap": ("30", 30.0), "objective.margin_tau": ("0.9", 0.9),
             "objective.small_gain_knee": ("0.8", 0.8),
             "objective.train_noise_sigma": ("0.5", 0.5),
             "objective.train_noise_mode": ("absolute", "absolute"),
             "objective.fixed_noise_scale": ("1", 1.0), "model.first_layer_norm": ("false", False),
             "model.embed_init_std": ("1.0", 1.0), "optimizer.decay_embeddings": ("no", False)}
    for key, (text, value) in typed.items():
        assert run_plan.coerce(config, key, text) == value, key
