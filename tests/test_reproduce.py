"""The reproduction study: a shrunken experiment end to end, resumption, failures, bad input.

The end-to-end tests run ``scripts/reproduce.py`` as a subprocess on ``shakespeare_full``
shrunk to a 1-layer, d = 16 model trained for 6 steps on a synthetic text, two seeds of two
runs, with a persistent compilation cache shared by every subprocess. The aggregation and the
verdicts are checked as pure functions against numbers worked out by hand.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from _train_helpers import Result, train_env, write_text

from stm_jax.errors import UserError
from stm_jax.study import claims, experiments, reproduce
from stm_jax.study import plan as run_plan
from stm_jax.study.summary import aggregate, evaluate_claims, headline_metrics

# One xdist worker runs this module (pytest --dist loadgroup), so its module-scoped
# fixtures are built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("reproduce")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHRINK = ("model.num_layers=1", "model.num_heads=2", "model.d_model=16", "model.context=16",
          "model.dropout=0.0", "batch_size=4", "num_steps=6", "eval_every=6",
          "checkpoint_every=6", "eval_batches=2", "log_every=3",
          "peak_flops=1e11")  # MFU against a given peak: no matmul measured in each training
RUNS = "ce,margin_0.02"


def reproduce_args(data_root: Path, output_dir: Path, *extra: str, seeds: int = 2) -> list[str]:
    return ["--experiment=shakespeare_full", "--allow_cpu", f"--data_root={data_root}",
            f"--output_dir={output_dir}", f"--seeds={seeds}",
            *(f"--override={item}" for item in SHRINK), *extra]


def run_script(args: list[str], env: dict, timeout: float = 300) -> Result:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return train_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "tinyshakespeare").mkdir()
    write_text(root / "tinyshakespeare" / "input.txt", num_lines=300)
    return root


@pytest.fixture(scope="module")
def study(data_root, env, tmp_path_factory):
    """(result, experiment folder, args) of one shrunken study, two trainings at a time."""
    output_dir = tmp_path_factory.mktemp("results")
    args = reproduce_args(data_root, output_dir, f"--runs={RUNS}", "--jobs=2")
    result = run_script(args, env)
    assert result.returncode == 0, result.describe()
    return result, output_dir / "shakespeare_full", args


def checkpoint_mtimes(experiment_dir: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns
            for path in experiment_dir.glob("runs/*/seed*/checkpoints/**/*") if path.is_file()}


def test_study_prints_one_progress_line_per_run(study):
    result, _, _ = study
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert sorted(line.split("]")[0] for line in lines) == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert all("trained and evaluated: val BPC" in line and "elapsed" in line for line in lines)
    assert "ce/seed0" in result.stdout and "margin_0.02/seed1" in result.stdout


def test_summary_has_runs_variants_and_claims(study):
    _, experiment_dir, _ = study
    summary = json.loads((experiment_dir / reproduce.SUMMARY_FILE).read_text())
    assert [(r["run"], r["seed"]) for r in summary["runs"]] == [
        ("ce", 0), ("ce", 1), ("margin_0.02", 0), ("margin_0.02", 1)]
    for run in summary["runs"]:
        assert run["step"] == 6 and run["settings"]["model.d_model"] == 16
        for key in ("val_bpc", "val_accuracy", "bpc_absolute_0.5", "accuracy_relative_0.5",
                    "margin_min_layer0", "margin_q05_min", "infeasible_fraction",
                    "support_count", "train_wall_s"):
            assert isinstance(run["metrics"][key], float), key
    for name in ("ce", "margin_0.02"):
        variant = summary["variants"][name]
        assert variant["n"] == 2 and variant["seeds"] == [0, 1]
        stat = variant["metrics"]["val_bpc"]
        values = [r["metrics"]["val_bpc"] for r in summary["runs"] if r["run"] == name]
        assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(values) / 2)
        assert stat["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert summary["variants"]["margin_0.02"]["settings"]["objective.lambda_m"] == 0.02
    assert summary["variants"]["margin_0.02"]["settings"]["objective.barrier_step_fraction"] == 1
    verdicts = {claim["claim"]: claim["verdict"] for claim in summary["claims"]}
    assert set(verdicts) == {"clean_cost", "robustness", "lambda_optimum", "margin_geometry"}
    assert set(verdicts.values()) <= set(claims.VERDICTS)
    assert verdicts["lambda_optimum"] == "not run"  # one lambda: no sweep
    assert summary["paper"]["clean_cost"] == 0.017 and summary["inconsistent_settings"] == []
    assert summary["invocations"][0]["environment"]["versions"]["jax"] == jax.__version__


def test_report_has_setup_tables_and_verdicts(study):
    _, experiment_dir, args = study
    report = (experiment_dir / reproduce.REPORT_FILE).read_text(encoding="utf-8")
    for heading in ("## Setup", "## Verdicts", "## Clean cost", "## Robustness at sigma = 0.5",
                    "## The lambda_m sweep", "## Margin geometry",
                    "## Training cost and every run", "## Plots"):
        assert heading in report, heading
    assert "python scripts/reproduce.py " + " ".join(args) in report
    assert f"jax {jax.__version__}" in report and "flax " in report and "cores" in report
    assert "| ce | 0 | 2 | " in report and "| margin_0.02 | 0.02 | 2 | " in report
    assert "(paper: CE 2.122, margin 2.158, +1.7%)" in report and "(paper: +12 points)" in report
    verdict_rows = [line for line in report.splitlines() if line.endswith("** |")]
    assert len(verdict_rows) == 4 and "**not run** |" in verdict_rows[2]
    assert "## Discussion" not in report


def test_plots_are_png(study):
    _, experiment_dir, _ = study
    for name in ("bpc_vs_sigma.png", "lambda_sweep.png", "margin_hist.png", "support_tokens.png"):
        assert (experiment_dir / name).read_bytes()[:8] == PNG_MAGIC, name


def test_rerun_skips_finished_runs_and_trains_nothing(study, env):
    _, experiment_dir, args = study
    before = checkpoint_mtimes(experiment_dir)
    result = run_script(args, env)
    assert result.returncode == 0, result.describe()
    assert result.stdout.count("skipped: already evaluated at step 6") == 4
    assert checkpoint_mtimes(experiment_dir) == before and before


def test_report_only_regenerates_with_notes(study, tmp_path):
    _, experiment_dir, _ = study
    copy = tmp_path / "shakespeare_full"
    shutil.copytree(experiment_dir, copy, ignore=shutil.ignore_patterns("*.png", "report.md"))
    (copy / reproduce.NOTES_FILE).write_text("The barrier did nothing in 6 steps.\n")
    reproduce.reproduce(reproduce.Options("shakespeare_full", report_only=True,
                                          output_dir=str(tmp_path)), ROOT, echo=lambda _: None)
    report = (copy / reproduce.REPORT_FILE).read_text(encoding="utf-8")
    assert report.endswith("## Discussion\n\nThe barrier did nothing in 6 steps.\n")
    assert (copy / "margin_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_failed_run_is_reported_and_the_others_go_on(study, data_root, env, tmp_path):
    """ce/seed0 cannot train (damaged config.json); margin_0.02/seed0, trained, is evaluated."""
    _, experiment_dir, _ = study
    runs = tmp_path / "shakespeare_full" / "runs"
    shutil.copytree(experiment_dir / "runs" / "margin_0.02" / "seed0",
                    runs / "margin_0.02" / "seed0",
                    ignore=shutil.ignore_patterns("eval_*", "*.png", "margins.npz"))
    (runs / "ce" / "seed0").mkdir(parents=True)
    (runs / "ce" / "seed0" / "config.json").write_text("{damaged")
    result = run_script(reproduce_args(data_root, tmp_path, f"--runs={RUNS}", seeds=1), env)
    assert result.returncode == 1, result.describe()
    assert "ce/seed0: FAILED: train.py exited with code 2" in result.stdout
    assert "| error: " in result.stdout and "config.json is unreadable" in result.stdout
    assert "margin_0.02/seed0: evaluated (already trained): val BPC" in result.stdout
    assert result.stderr_lines[-1].startswith("error: 1 of 2 runs failed: ce/seed0;")
    summary = json.loads((tmp_path / "shakespeare_full" / "summary.json").read_text())
    assert [(r["run"], r["seed"]) for r in summary["runs"]] == [("margin_0.02", 0)]


SCRIPT_MISTAKES = {  # through the script: one error line, exit code 2
    "unknown experiment": ["--experiment=nope"],
    "malformed override": ["--override=model.d_model"],
    "no accelerator": ["--allow_cpu=false"],
}
MISTAKES = {  # the same checks in-process (each script call costs seconds of imports)
    "unknown run": (dict(runs=("ce", "nope")), "unknown run.s. nope in shakespeare_full"),
    "unknown key": (dict(overrides=("model.depth=3",)), "the config has no key 'model.depth'"),
    "badly typed value": (dict(overrides=("num_steps=six",)), "expected a value of type int"),
    "no seeds": (dict(seeds=0), "--seeds=0 must be at least 1"),
    "no jobs": (dict(jobs=0), "--jobs=0 must be at least 1"),
    "clashing override": (dict(overrides=("objective.lambda_m=0.5",), runs=("margin_0.02",)),
                          "clashes with run margin_0.02"),
    "missing data file": (dict(data_root="no_such_folder"), "has no tinyshakespeare/input.txt"),
    "no data root": (dict(data_root=None), "needs --data_root"),
    "nothing to report": (dict(report_only=True), "nothing to report"),
}


def test_script_mistakes_print_one_error_line_and_create_nothing(data_root, env, tmp_path):
    output_dir = tmp_path / "results"
    running = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), *reproduce_args(data_root, output_dir), *extra],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, extra in SCRIPT_MISTAKES.items()}
    errors = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        result = Result(process.returncode, stdout, stderr)
        assert result.returncode == 2, (name, result.describe())
        assert len(result.stderr_lines) == 1, (name, result.describe())
        errors[name] = result.stderr_lines[0]
    assert errors["unknown experiment"].startswith("error: unknown experiment 'nope'; choose")
    assert errors["malformed override"].startswith("error: --override='model.d_model' is not")
    assert errors["no accelerator"].startswith("error: shakespeare_full needs a GPU or TPU")
    assert not output_dir.exists()


@pytest.mark.parametrize("name", MISTAKES)
def test_mistakes_raise_before_anything_is_written(name, data_root, tmp_path):
    fields, message = MISTAKES[name]
    options = dict(experiment="shakespeare_full", allow_cpu=True, data_root=str(data_root),
                   output_dir=str(tmp_path / "results"), overrides=SHRINK)
    with pytest.raises(UserError, match=message):
        reproduce.reproduce(reproduce.Options(**{**options, **fields}), ROOT)
    assert not (tmp_path / "results").exists()


def test_dry_run_prints_commands_and_writes_nothing(data_root, tmp_path):
    lines = []
    options = reproduce.Options("shakespeare_full", seeds=2, runs=("ce",), dry_run=True,
                                data_root=str(data_root), output_dir=str(tmp_path / "results"))
    assert reproduce.reproduce(options, ROOT, echo=lines.append) == []  # no device check
    text = "\n".join(lines)
    assert text.startswith("shakespeare_full: 2 runs (2 to train or evaluate)")
    assert "ce/seed1 [pending]" in text and "--config.seed=1" in text
    assert "python scripts/train.py --config=configs/shakespeare_char.py:ce " in text
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Pure functions


def stat(mean, std=None, n=1):
    return {"mean": mean, "std": std, "n": n}


def test_aggregate_mean_and_sample_std():
    assert aggregate([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert aggregate([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert aggregate([None, 2.0, 4.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)),
                                           "n": 2}
    assert aggregate([]) == {"mean": None, "std": None, "n": 0}


def test_difference_and_seed_noise():
    spread = claims.difference(stat(2.0, 0.3, 3), stat(2.5, 0.4, 4))
    assert spread["difference"] == pytest.approx(0.5)
    assert spread["standard_error"] == pytest.approx(math.sqrt(0.09 / 3 + 0.16 / 4))  # 0.2646
    assert spread["within_seed_noise"] is True  # 0.5 <= 2 x 0.2646
    assert claims.difference(stat(2.0, 0.01, 3), stat(2.5, 0.01, 3))["within_seed_noise"] is False
    assert claims.difference(stat(2.0), stat(2.5))["within_seed_noise"] is None


@pytest.mark.parametrize("barrier_bpc, verdict", [
    (2.0, "reproduced"), (2.07, "reproduced"), (2.1, "partly reproduced"),
    (2.2, "not reproduced"), (1.9, "reproduced")])
def test_clean_cost_verdict(barrier_bpc, verdict):
    result = claims.clean_cost(stat(2.0, 0.01, 3), stat(barrier_bpc, 0.01, 3))
    assert result["verdict"] == verdict
    assert result["measured"] == pytest.approx((barrier_bpc - 2.0) / 2.0)
    assert claims.clean_cost(None, stat(2.0))["verdict"] == "not run"


@pytest.mark.parametrize("ce, barrier, verdict", [
    (stat(0.30, 0.01, 3), stat(0.42, 0.01, 3), "reproduced"),  # +12 points, beyond noise
    (stat(0.30, 0.10, 3), stat(0.40, 0.10, 3), "partly reproduced"),  # +10, within noise
    (stat(0.30, 0.01, 3), stat(0.33, 0.01, 3), "partly reproduced"),  # +3 points
    (stat(0.30), stat(0.40), "partly reproduced"),  # one seed: noise unknown
    (stat(0.30, 0.01, 3), stat(0.29, 0.01, 3), "not reproduced")])
def test_robustness_verdict(ce, barrier, verdict):
    result = claims.robustness_gain(ce, barrier)
    assert result["verdict"] == verdict
    assert result["measured"] == pytest.approx(100 * (barrier["mean"] - ce["mean"]))


@pytest.mark.parametrize("noisy, verdict, best", [
    ({0.01: 3.1, 0.02: 3.0, 0.05: 3.2}, "reproduced", 0.02),
    ({0.01: 3.1, 0.02: 3.05, 0.05: 3.0, 0.1: 3.2}, "partly reproduced", 0.05),  # neighbour
    ({0.005: 3.0, 0.01: 3.5, 0.02: 3.6, 0.05: 3.7}, "not reproduced", 0.005),
    ({0.005: 3.0, 0.01: 3.5, 0.02: 3.01, 0.05: 3.7}, "partly reproduced", 0.005)])  # noise
def test_lambda_optimum_verdict(noisy, verdict, best):
    result = claims.lambda_optimum({lam: stat(bpc, 0.02, 3) for lam, bpc in noisy.items()})
    assert (result["verdict"], result["measured"]) == (verdict, best)
    assert claims.lambda_optimum({0.02: stat(3.0)})["verdict"] == "not run"


def test_margin_geometry_verdict():
    verdict = lambda q_ce, q_b, i_ce, i_b: claims.margin_geometry(  # noqa: E731
        stat(q_ce), stat(q_b), stat(i_ce), stat(i_b))["verdict"]
    assert verdict(0.2, 0.3, 0.01, 0.0) == "partly reproduced"  # one seed: noise unknown
    assert verdict(0.3, 0.2, 0.02, 0.01) == "partly reproduced"
    assert verdict(0.3, 0.2, 0.01, 0.02) == "not reproduced"
    seeded = lambda q_ce, q_b, i_ce, i_b: claims.margin_geometry(  # noqa: E731
        stat(q_ce, 0.01, 3), stat(q_b, 0.01, 3), stat(i_ce), stat(i_b))["verdict"]
    assert seeded(0.2, 0.3, 0.01, 0.0) == "reproduced"
    assert seeded(0.2, 0.3, 0.01, 0.02) == "partly reproduced"
    within_noise = claims.margin_geometry(stat(0.2, 0.1, 3), stat(0.21, 0.1, 3), stat(0.0),
                                          stat(0.0))
    assert within_noise["verdict"] == "partly reproduced"  # higher, but within seed noise


def eval_results(bpc, accuracy, margins=(0.5, 0.2)):
    """The parts of an eval_results.json the study reads, for one seed."""
    rows = [{"sigma": 0.0, "bpc": bpc, "accuracy": accuracy},
            {"sigma": 0.5, "bpc": bpc + 1, "accuracy": accuracy / 2}]
    layers = [{"layer": i, "margin_min": m, "margin_q05": m + 0.1, "infeasible_fraction": 0.25 * i,
               "support_threshold_count": i} for i, m in enumerate(margins)]
    return {"splits": {"validation": {"clean": {"bpc": bpc, "accuracy": accuracy},
                                      "robustness": {"absolute": rows, "relative": rows}}},
            "margins": {"layers": layers, "num_tokens": 10}}


def test_headline_metrics_flatten_eval_results():
    metrics = headline_metrics(eval_results(2.0, 0.4), {"wall_s": 12.5, "tokens_per_s": None})
    assert metrics["val_bpc"] == 2.0 and metrics["bpc_absolute_0.5"] == 3.0
    assert metrics["accuracy_relative_0.5"] == 0.2 and metrics["bpc_relative_0"] == 2.0
    assert metrics["margin_min"] == 0.2 and metrics["margin_q05_min"] == pytest.approx(0.3)
    assert metrics["margin_q05_layer0"] == pytest.approx(0.6)
    assert metrics["infeasible_fraction"] == 0.125 and metrics["support_count"] == 1.0
    assert metrics["support_fraction"] == 0.05  # 1 of 2 layers x 10 tokens
    assert metrics["train_wall_s"] == 12.5 and metrics["tokens_per_s"] is None


def test_claims_from_variants():
    experiment = experiments.get_experiment("shakespeare_cpu")
    variants = {
        "ce": {"metrics": {"val_bpc": stat(2.0, 0.01, 3),
                           "accuracy_absolute_0.5": stat(0.3, 0.01, 3)}},
        "margin_0.02": {"settings": {"objective.lambda_m": 0.02},
                        "metrics": {"val_bpc": stat(2.1, 0.01, 3),
                                    "accuracy_absolute_0.5": stat(0.35, 0.01, 3),
                                    "bpc_absolute_0.5": stat(3.0, 0.01, 3)}},
        "margin_0.1": {"settings": {"objective.lambda_m": 0.1},
                       "metrics": {"bpc_absolute_0.5": stat(3.1, 0.01, 3)}},
    }
    verdicts = {c["claim"]: c["verdict"] for c in evaluate_claims(experiment, variants)}
    assert verdicts == {"clean_cost": "partly reproduced", "robustness": "partly reproduced",
                        "lambda_optimum": "reproduced", "margin_geometry": "not run"}


# ---------------------------------------------------------------------------------------------
# Planning


def test_settings_precedence_and_commands(tmp_path):
    experiment = experiments.Experiment(
        name="x", description="", config="configs/tiny.py", size="",
        data=experiments.TINY_SHAKESPEARE, runs=experiments.PAPER_RUNS,
        defaults=(("objective.barrier_fraction", 0.25), ("num_steps", 40)))
    runs = experiments.select_runs(experiment, ["margin_0.02_layer"])
    plans = run_plan.plan_runs(experiment, runs, 2, ["num_steps=7", "model.dropout=0.1"],
                               data_root="data", experiment_dir=tmp_path / "x", repo_root=ROOT)
    assert [plan.label for plan in plans] == ["margin_0.02_layer/seed0", "margin_0.02_layer/seed1"]
    assert plans[1].settings == {
        "seed": 1, "data.text_file": "data/tinyshakespeare/input.txt",
        "objective.barrier_fraction": 0.25, "num_steps": 7, "model.dropout": 0.1,
        "objective.lambda_m": 0.02, "objective.scope": "layer"}
    assert plans[1].num_steps == 7
    assert plans[1].workdir == tmp_path / "x" / "runs" / "margin_0.02_layer" / "seed1"
    command = run_plan.shell_line(plans[1].train_command)
    assert command.startswith("python scripts/train.py --config=configs/tiny.py:margin ")
    assert "--config.objective.scope=layer" in command and "--config.num_steps=7" in command
    assert plans[1].eval_command[1] == f"--workdir={plans[1].workdir}"


def test_wikitext_plan_uses_the_proxy_split(tmp_path):
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        (tmp_path / "wikitext-2-raw").mkdir(exist_ok=True)
        (tmp_path / "wikitext-2-raw" / name).write_text("text")
    experiment = experiments.get_experiment("wikitext2_cpu")
    run_plan.check_data(experiment, str(tmp_path))
    [plan] = run_plan.plan_runs(experiment, experiments.select_runs(experiment, ["map"]), 1, [],
                                data_root=str(tmp_path), experiment_dir=tmp_path / "out",
                                repo_root=ROOT)
    assert plan.train_command[1] == "--config=configs/wikitext2_char.py:cpu,map"
    assert "--config.data.wikitext_proxy=true" in plan.train_command
    assert f"--config.data.manual_dir={tmp_path}/wikitext-2-raw" in plan.train_command
    with pytest.raises(UserError, match="no wikitext-2-raw/wiki.valid.raw"):
        (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").unlink()
        run_plan.check_data(experiment, str(tmp_path))


def saved_config(plan, **changes) -> str:
    """The config.json a run of ``plan`` writes, with ``changes`` (flattened keys)."""
    nested = {}
    for key, value in {**plan.config, **changes}.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return json.dumps(nested)


def test_a_workdir_trained_with_other_settings_is_refused(tmp_path):
    experiment = experiments.get_experiment("shakespeare_cpu")
    [plan] = run_plan.plan_runs(experiment, experiments.select_runs(experiment, ["ce"]), 1,
                                ["num_steps=9"], data_root="d", experiment_dir=tmp_path,
                                repo_root=ROOT)
    plan.workdir.mkdir(parents=True)
    config_file = plan.workdir / "config.json"
    config_file.write_text(saved_config(plan, **{"data.text_file": "elsewhere", "log_every": 1}))
    run_plan.check_workdir_settings(plan)  # data paths and bookkeeping may differ
    config_file.write_text(saved_config(plan, num_steps=8))
    with pytest.raises(UserError, match="was trained with num_steps=8, this command gives 9"):
        run_plan.check_workdir_settings(plan)
    # A setting the command no longer passes (back to the config's default) counts too.
    config_file.write_text(saved_config(plan, **{"objective.chunk_size": 8}))
    with pytest.raises(UserError, match="objective.chunk_size=8, this command gives 0"):
        run_plan.check_workdir_settings(plan)
    # A config.json written before barrier_sampling existed drew shared subsets: the same as
    # this experiment's pinned "shared", so it is resumed.
    config = json.loads(saved_config(plan))
    del config["objective"]["barrier_sampling"]
    config_file.write_text(json.dumps(config))
    run_plan.check_workdir_settings(plan)
