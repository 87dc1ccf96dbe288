"""Evaluation, restore and sampling on one tiny trained workdir, checked against oracles.

The oracles recompute each number from the restored model by the shortest route: BPC with
optax's cross-entropy on the same windows, the noise by hand from the documented key, margins
with ``attention.margins`` on each layer's input, greedy sampling with one forward pass.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_helpers import snapshot, write_text

from configs import tiny
from stm_jax import data, evaluation
from stm_jax.core import attention
from stm_jax.errors import UserError
from stm_jax.evaluation import evaluate, sampling
from stm_jax.model import Record
from stm_jax.trainer import restore
from stm_jax.trainer.loop import train_and_evaluate

# One xdist worker runs this module (pytest --dist loadgroup), so its module-scoped
# fixtures are built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("evaluate")

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCHES = 2  # equal to tiny's eval_batches, so training's own validation BPC is comparable
SETTINGS = dict(sigmas=(0.0, 0.5, 1.0), max_batches=MAX_BATCHES, margin_batches=1,
                margin_batch_size=4, bottom_k=5, support_windows=2, seed=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model trained for 10 steps on a synthetic text (shared by every test)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_text(root / "corpus.txt", num_lines=300)
    config = tiny.get_config()
    config.data.text_file = str(root / "corpus.txt")
    config.update(num_steps=10, progress=False, checkpoint_every=10)
    train_and_evaluate(config, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def evaluated(workdir):
    """(results, checkpoint snapshot before, after) of one evaluate_workdir call."""
    before = snapshot(workdir / "checkpoints")
    results = evaluate.evaluate_workdir(workdir, **SETTINGS)
    return results, before, snapshot(workdir / "checkpoints")


@pytest.fixture(scope="module")
def trained(workdir):
    return restore.load_trained(workdir)


def validation_batches(workdir, config):
    tokens, _, _ = data.load_dataset(config.data, workdir)
    return list(data.eval_batches(tokens["validation"], batch_size=config.batch_size,
                                  context=config.model.context, max_batches=MAX_BATCHES))


def test_writes_results_report_and_plots(workdir, evaluated):
    results, _, _ = evaluated
    on_disk = json.loads((workdir / evaluation.RESULTS_FILE).read_text())
    assert on_disk["splits"]["validation"]["clean"] == results["splits"]["validation"]["clean"]
    assert on_disk["step"] == 10 and "test" in on_disk["skipped_splits"]
    report = (workdir / evaluation.REPORT_FILE).read_text(encoding="utf-8")
    for heading in ("## Bits per character", "## Robustness to noise (validation)",
                    "## Margins to degeneracy", "## Support tokens in validation windows"):
        assert heading in report
    assert "| test | not evaluated: the dataset has no 'test' split" in report
    for plot in (evaluation.BPC_PLOT, evaluation.MARGIN_PLOT):
        assert (workdir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.glob(".*.tmp"))


def test_clean_bpc_equals_cross_entropy_oracle(workdir, evaluated, trained):
    results, _, _ = evaluated
    model, config, _, _ = trained
    losses, correct = [], []
    for inputs, targets in validation_batches(workdir, config):
        logits, _ = model(jnp.asarray(inputs))
        losses.append(optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets))
        correct.append(np.argmax(logits, axis=-1) == targets)
    clean = results["splits"]["validation"]["clean"]
    assert clean["bpc"] == pytest.approx(float(np.mean(losses)) / math.log(2), rel=1e-5)
    assert clean["accuracy"] == pytest.approx(float(np.mean(correct)))
    assert clean["num_tokens"] == MAX_BATCHES * config.batch_size * config.model.context
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert clean["bpc"] == pytest.approx(summary["val_bpc"], rel=1e-5)


def test_noise_is_the_documented_draw_and_hurts(workdir, evaluated, trained):
    results, _, _ = evaluated
    model, config, _, _ = trained
    rows = results["splits"]["validation"]["robustness"]
    by_sigma = {mode: {row["sigma"]: row["bpc"] for row in rows[mode]} for mode in rows}
    assert by_sigma["absolute"][0.0] == by_sigma["relative"][0.0]
    assert by_sigma["absolute"][1.0] > by_sigma["absolute"][0.0] + 0.1
    assert by_sigma["relative"][1.0] > by_sigma["relative"][0.0]
    # Oracle: noise = normal(fold_in(PRNGKey(seed), batch)), times sigma (and the token RMS).
    for mode in ("absolute", "relative"):
        losses = []
        for index, (inputs, targets) in enumerate(validation_batches(workdir, config)):
            x = model.embed(jnp.asarray(inputs))
            noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), index), x.shape)
            scale = 0.5 * (jnp.sqrt(jnp.mean(x**2, -1, keepdims=True)) if mode == "relative"
                           else 1.0)
            logits, _ = model.from_embeddings(x + scale * noise)
            losses.append(optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets))
        assert by_sigma[mode][0.5] == pytest.approx(float(np.mean(losses)) / math.log(2),
                                                    rel=1e-5)


def test_latent_rms_and_the_ratios_next_to_clean(workdir, evaluated, trained):
    """The embedding's RMS over tokens and dimensions, absolute sigma in its units, and the
    noisy/clean ratios, each from the evaluation's own clean and noisy numbers."""
    results, _, _ = evaluated
    model, config, _, _ = trained
    squares = [np.mean(np.asarray(model.embed(jnp.asarray(inputs))) ** 2)
               for inputs, _ in validation_batches(workdir, config)]
    split = results["splits"]["validation"]
    rms = split["clean"]["latent_rms"]
    assert rms == pytest.approx(math.sqrt(np.mean(squares)), rel=1e-5)
    for mode, rows in split["robustness"].items():
        for row in rows:
            assert row["accuracy_ratio"] == pytest.approx(
                row["accuracy"] / split["clean"]["accuracy"])
            assert row["bpc_ratio"] == pytest.approx(row["bpc"] / split["clean"]["bpc"])
            assert ("sigma_in_rms" in row) == (mode == "absolute")
            if mode == "absolute":
                assert row["sigma_in_rms"] == pytest.approx(row["sigma"] / rms)


def test_noise_on_a_later_layer(workdir, trained, tmp_path):
    """--noise_layer=1: the noise on the residual stream entering block 1 (the oracle runs
    block 0 by hand), in files of its own; the standard results are left as they were."""
    model, config, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    standard = (copy / evaluation.RESULTS_FILE).read_bytes()
    results = evaluate.evaluate_workdir(copy, noise_layer=1, sigmas=(0.0, 0.5),
                                        noise_modes=("relative",), splits=("validation",),
                                        **{key: SETTINGS[key] for key in (
                                            "max_batches", "margin_batches",
                                            "margin_batch_size", "bottom_k", "seed")})
    assert (copy / evaluation.output_name(evaluation.RESULTS_FILE, "noise_layer1")).exists()
    assert (copy / evaluation.RESULTS_FILE).read_bytes() == standard
    losses = []
    for index, (inputs, targets) in enumerate(validation_batches(workdir, config)):
        x, _ = model.blocks[0](model.embed(jnp.asarray(inputs)), record=Record(),
                               dtype=jnp.float32, key=None)
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), index), x.shape)
        noisy = x + 0.5 * jnp.sqrt(jnp.mean(x**2, -1, keepdims=True)) * noise
        logits, _ = model.from_embeddings(noisy, start_layer=1)
        losses.append(optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets))
    row = results["splits"]["validation"]["robustness"]["relative"][1]
    assert row["bpc"] == pytest.approx(float(np.mean(losses)) / math.log(2), rel=1e-5)
    with pytest.raises(UserError, match="noise_layer=2 must be between 0"):
        evaluate.evaluate_workdir(copy, noise_layer=2)


def test_noise_gain_and_spectra_per_layer(workdir, evaluated, trained):
    """The per-layer noise gain from the same draw (oracle by hand on the margin windows),
    and the self-map spectrum's summary against the eigenvalues of the dense blocks."""
    results, _, _ = evaluated
    model, config, _, _ = trained
    tokens, _, _ = data.load_dataset(config.data, workdir)
    windows = next(data.eval_batches(tokens["validation"], batch_size=4,
                                     context=config.model.context))[0]
    x0 = model.embed(jnp.asarray(windows))
    rms = jnp.sqrt(jnp.mean(x0**2, -1, keepdims=True))
    key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
    delta = 0.01 * rms * jax.random.normal(key, x0.shape)
    clean, noisy, gains = x0, x0 + delta, []
    for block in model.blocks:
        clean, _ = block(clean, record=Record(), dtype=jnp.float32, key=None)
        noisy, _ = block(noisy, record=Record(), dtype=jnp.float32, key=None)
        gains.append(float(np.mean(np.linalg.norm(noisy - clean, axis=-1)
                                   / np.linalg.norm(delta, axis=-1))))
    layers = results["margins"]["layers"]
    assert [layer["noise_gain"] for layer in layers] == pytest.approx(gains, rel=1e-3)
    # The spectrum: the first window's layer-0 self-maps I - J_t, densely.
    u = model.blocks[0].ln_attn(x0[0])
    params = model.blocks[0].attention_params()
    full = jax.jacfwd(lambda v: attention.residual(params, v))(u)
    self_maps = np.eye(u.shape[-1]) - np.asarray(jnp.einsum("tdte->tde", full))
    radius = np.abs(np.linalg.eigvals(self_maps)).max(axis=-1)
    spectrum = layers[0]["spectrum"]
    assert spectrum["spectral_radius_quantiles"]["q100"] >= radius.max() - 1e-5
    assert spectrum["spectral_radius_quantiles"]["q00"] <= radius.min() + 1e-5
    assert 0.0 <= spectrum["fraction_real_above_one"] <= 1.0


def test_margins_and_support_tokens_match_attention_oracle(workdir, evaluated, trained):
    results, _, _ = evaluated
    model, config, _, _ = trained
    window = validation_batches(workdir, config)[0][0][:1]  # the first validation window
    x = model.embed(jnp.asarray(window))
    reported = results["margins"]["windows"][0]["layers"]
    for layer, block in enumerate(model.blocks):
        u = block.ln_attn(x)
        oracle = np.asarray(attention.margins(block.attention_params(), u[0]))
        np.testing.assert_allclose(reported[layer]["margin"], oracle, rtol=1e-4, atol=1e-5)
        assert reported[layer]["bottom_k"] == sorted(np.argsort(oracle)[:5].tolist())
        assert results["margins"]["layers"][layer]["margin_min"] <= oracle.min() + 1e-5
        x, _ = block(x, record=Record(), dtype=jnp.float32, key=None)
    assert results["margins"]["num_windows"] == 4
    assert 0.0 <= results["margins"]["layers"][0]["infeasible_fraction"] <= 1.0


def test_margins_npz_holds_the_reported_windows(workdir, evaluated, trained):
    results, _, _ = evaluated
    _, config, vocab, _ = trained
    with np.load(workdir / evaluation.MARGINS_FILE) as saved:
        inputs, margin, head_margin = saved["inputs"], saved["margin"], saved["head_margin"]
    num_windows = results["margins"]["num_windows"]
    assert inputs.shape == (num_windows, config.model.context)
    assert margin.shape == (config.model.num_layers, *inputs.shape)
    assert head_margin.shape == (config.model.num_layers, num_windows, config.model.num_heads,
                                 config.model.context)
    for window in results["margins"]["windows"]:
        index = window["window"]
        assert vocab.decode(inputs[index]) == window["text"]
        for layer in window["layers"]:
            np.testing.assert_allclose(margin[layer["layer"], index], layer["margin"], rtol=1e-6)
    assert float(margin[0].min()) == pytest.approx(results["margins"]["layers"][0]["margin_min"])


def test_checkpoints_untouched_by_evaluation(evaluated):
    _, before, after = evaluated
    assert before == after and before


def test_sampling_is_deterministic_cropped_and_in_vocabulary(trained):
    model, _, vocab, _ = trained
    long_prompt = "to be or not to be that is the question whether tis"  # > context = 32
    first = sampling.sample(model, vocab, long_prompt, num_tokens=12, seed=5, top_k=4)
    assert first == sampling.sample(model, vocab, long_prompt, num_tokens=12, seed=5, top_k=4)
    assert len(first) == 12 and set(first) <= set(vocab.chars)
    greedy = sampling.sample(model, vocab, long_prompt, num_tokens=1, temperature=0)
    window = vocab.encode(long_prompt)[-model.context:]
    logits, _ = model(jnp.asarray(window)[None])
    assert greedy == vocab.chars[int(np.argmax(logits[0, -1]))]
    with pytest.raises(UserError, match="not in the model's vocabulary: 'Z', 'é'"):
        sampling.sample(model, vocab, "to Zé", num_tokens=3)


def test_load_trained_errors_leave_the_folder_as_it_was(workdir, tmp_path):
    with pytest.raises(UserError, match="config.json does not exist"):
        restore.load_trained(tmp_path)
    for name in ("config.json", "vocab.json"):
        shutil.copy(workdir / name, tmp_path / name)
    with pytest.raises(UserError, match="no checkpoint was saved yet"):
        restore.load_trained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "vocab.json"]
    with pytest.raises(UserError, match="no checkpoint of step 3"):
        restore.load_trained(workdir, step=3)


def test_scripts_end_to_end(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*", "*.png"))
    commands = {
        "evaluate": ["scripts/evaluate.py", f"--workdir={copy}", "--sigmas=0,0.5",
                     "--max_batches=1", "--margin_batches=1", "--margin_batch_size=2"],
        "sample": ["scripts/sample.py", f"--workdir={copy}", "--prompt=to be", "--num_chars=20",
                   "--seed=1"],
        "oov": ["scripts/sample.py", f"--workdir={copy}", "--prompt=to bé", "--num_chars=5"],
    }
    running = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in commands.items()}
    done = {name: (process, *process.communicate(timeout=120))
            for name, process in running.items()}
    process, out, err = done["evaluate"]
    assert process.returncode == 0, err
    assert "validation: bpc" in out and (copy / evaluation.REPORT_FILE).exists()
    process, out, err = done["sample"]
    assert process.returncode == 0, err
    assert out.startswith("to be") and len(out) == len("to be") + 20 + 1  # print's newline
    process, out, err = done["oov"]
    assert process.returncode == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: the prompt has characters not in the model's vocabulary: "
                               "'é';")
