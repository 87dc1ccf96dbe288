"""``scripts/analyze.py`` on a tiny random GPT-2 directory and on a BPE training run: its numbers
against ``core.attention`` on each layer's input, its HTML page parsed, its bad inputs."""

from __future__ import annotations

import html.parser
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from _gpt2_helpers import tiny_hf_config, write_gpt2_dir
from _train_helpers import ROOT, snapshot, write_text

from configs import tiny
from stm_jax.core import attention, barrier
from stm_jax.data.tokenizer import BPETokenizer
from stm_jax.evaluation import analyze, evaluate, sampling
from stm_jax.model import Record
from stm_jax.trainer import metrics, restore
from stm_jax.trainer.loop import train_and_evaluate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

pytestmark = pytest.mark.xdist_group("analyze")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Héllo wörld — 日本語 😀\n") * 4


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = BPETokenizer.train([TEXT * 5], 320)
    write_gpt2_dir(root / "gpt2", tiny_hf_config(tokenizer.size, n_head=2, n_embd=16,
                                                 n_positions=40), seed=11,
                   tokenizer_json=tokenizer.serialized)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def analysed(gpt2_dir):
    out = gpt2_dir / "head"
    results = analyze.analyze(gpt2_dir / "gpt2", gpt2_dir / "text.txt", out, max_tokens=70,
                              bottom_k=4, tau=0.05, chunk_size=16, progress=False)
    return results, out


# The oracles, jitted: eagerly, their many small operations took most of a test's time.
head_oracle = jax.jit(lambda p, u: (attention.margins(p, u, scope="head"),
                                    attention.causal_self_attention(p, u, scope="head")[1]))
layer_oracle = jax.jit(lambda p, u: (attention.margins(p, u),
                                     attention.causal_self_attention(p, u, scope="layer")[1]))


def layer_inputs(model, ids):
    """Each layer's attention input u^l for one window, by walking the blocks."""
    x = model.embed(jnp.asarray(ids)[None])
    inputs = []
    for block in model.blocks:
        inputs.append(block.ln_attn(x)[0])
        x, _ = block(x, record=Record(), dtype=jnp.float32, key=None)
    return inputs


def test_head_statistics_match_the_attention_oracle(gpt2_dir, analysed):
    results, out = analysed
    model, vocab, _ = restore.load_checkpoint(gpt2_dir / "gpt2")
    ids = vocab.encode(TEXT)[:70]
    assert results["num_tokens"] == 70 and results["settings"]["windows"] == [40, 30]
    with np.load(out / analyze.ARRAYS_FILE) as arrays:
        head_margin, head_logdet = arrays["head_margin"], arrays["head_logdet"]
        head_sign = arrays["head_sign"]
    start = 0
    for length in results["settings"]["windows"]:
        window = ids[start:start + length]
        for layer, u in enumerate(layer_inputs(model, window)):
            expected, stats = head_oracle(model.blocks[layer].attention_params(), u)
            got = head_margin[layer][:, start:start + length]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(head_logdet[layer][:, start:start + length],
                                       stats.head_logdet, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(head_sign[layer][:, start:start + length],
                                          stats.head_sign)
        start += length
    for layer in results["layers"]:
        margin = np.asarray(layer["margin"])
        np.testing.assert_allclose(margin, head_margin[layer["layer"]].min(axis=0), rtol=1e-6)
        # Support tokens: each window's 4 smallest margins and every margin <= tau.
        expected = set(np.flatnonzero(margin <= 0.05).tolist())
        expected |= set(np.argsort(margin[:40])[:4].tolist())
        expected |= set((40 + np.argsort(margin[40:])[:4]).tolist())
        assert layer["support"] == sorted(expected)
        # A token's barrier sums its heads' (as training's head scope); infeasible: any head.
        index = layer["layer"]
        per_head = barrier.smooth_log_barrier(head_sign[index], head_logdet[index], 1e-2)
        np.testing.assert_allclose(layer["barrier"], np.sum(per_head, axis=0), rtol=1e-5)
        assert layer["infeasible_fraction"] == pytest.approx(
            float(np.mean(np.any(head_sign[index] <= 0, axis=0))))
    assert "".join(results["tokens"]) == vocab.decode(ids)


def test_outputs_and_the_html_page(analysed):
    results, out = analysed
    for name in (analyze.ANALYSIS_FILE, analyze.REPORT_FILE, analyze.HTML_FILE,
                 analyze.ARRAYS_FILE):
        assert (out / name).is_file()
    for plot in (analyze.MARGIN_PLOT, analyze.HEAD_PLOT):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / analyze.ANALYSIS_FILE).read_text())["layers"][0]["support"] == \
        results["layers"][0]["support"]
    report = (out / analyze.REPORT_FILE).read_text(encoding="utf-8")
    assert "## Per layer" in report and "## Per head" in report
    page = SpanParser()
    page.feed((out / analyze.HTML_FILE).read_text(encoding="utf-8"))
    assert sorted(page.layers) == [layer["layer"] for layer in results["layers"]]
    for layer in results["layers"]:
        spans = page.layers[layer["layer"]]
        assert [index for index, classes, _ in spans if "support" in classes] == \
            layer["support"]  # one highlighted span per support token, in order
        assert [index for index, _, _ in spans] == list(range(results["num_tokens"]))
        assert "".join(text for _, _, text in spans) == "".join(results["tokens"])


HIGHLIGHTS = ((0xFF, 0xD2, 0x7A), (0xFF, 0x8A, 0x80))  # span.support, span.support.below-tau


def highlighted_pixels(page: Path, png: Path) -> int:
    """Pixels of the support-token colours in a headless Chromium screenshot of ``page``."""
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1000,1600", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.round(plt.imread(png)[..., :3] * 255).astype(int)
    return int(sum(np.all(np.abs(pixels - colour) <= 2, axis=-1).sum() for colour in HIGHLIGHTS))


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine")
def test_a_browser_shows_the_support_tokens_highlighted(analysed, tmp_path):
    """Rendered, the page shows the highlight colours; without the support class, none."""
    _, out = analysed
    page = (out / analyze.HTML_FILE).read_text(encoding="utf-8")
    plain = tmp_path / "plain.html"
    plain.write_text(page.replace('class="tok support', 'class="tok plain'), encoding="utf-8")
    assert 'class="tok support' in page
    assert highlighted_pixels(out / analyze.HTML_FILE, tmp_path / "page.png") > 100
    assert highlighted_pixels(plain, tmp_path / "plain.png") == 0


class SpanParser(html.parser.HTMLParser):
    """{layer: [(token index, classes, text)]} from the page's layer sections."""

    def __init__(self):
        super().__init__()
        self.layers, self.layer, self.span = {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.layer = int(attrs["data-layer"])
            self.layers[self.layer] = []
        elif tag == "span" and self.layer is not None:
            self.span = [int(attrs["data-index"]), attrs["class"].split(), ""]

    def handle_data(self, text):
        if self.span is not None:
            self.span[2] += text

    def handle_endtag(self, tag):
        if tag == "span" and self.span is not None:
            self.layers[self.layer].append(tuple(self.span))
            self.span = None
        elif tag == "section":
            self.layer = None


def test_layer_scope_is_the_exact_layer_block(gpt2_dir):
    results = analyze.analyze(gpt2_dir / "gpt2", gpt2_dir / "text.txt", gpt2_dir / "layer",
                              scope="layer", max_tokens=12, chunk_size=5, progress=False)
    model, vocab, _ = restore.load_checkpoint(gpt2_dir / "gpt2")
    for layer, u in enumerate(layer_inputs(model, vocab.encode(TEXT)[:12])):
        margins, stats = layer_oracle(model.blocks[layer].attention_params(), u)
        reported = results["layers"][layer]
        np.testing.assert_allclose(reported["margin"], margins, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(reported["logdet"], stats.logdet, rtol=1e-4, atol=1e-4)
        assert reported["infeasible_fraction"] == pytest.approx(float(np.mean(stats.sign <= 0)))


def run_script(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/analyze.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_bad_inputs_are_one_error_line_and_write_nothing(gpt2_dir, tmp_path):
    good = gpt2_dir / "gpt2"
    weights = (good / "model.safetensors").read_bytes()
    folders = {}
    for name in ("missing", "truncated", "llama", "foreign"):
        folder = folders[name] = tmp_path / name
        folder.mkdir()
        config = json.loads((good / "config.json").read_text())
        if name == "llama":
            config["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tokenizer.json").write_bytes((good / "tokenizer.json").read_bytes())
        if name != "missing":
            (folder / "model.safetensors").write_bytes(
                weights[:len(weights) - 100] if name == "truncated" else weights)
    BPETokenizer.train([TEXT], 280).save(folders["foreign"] / "tokenizer.json")
    text = gpt2_dir / "text.txt"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    cases = {
        "missing": (folders["missing"], text, "model.safetensors does not exist"),
        "truncated": (folders["truncated"], text, "truncated or damaged"),
        "llama": (folders["llama"], text, "model_type='llama', not 'gpt2'"),
        "foreign": (folders["foreign"], text, "do not belong together"),
        "latin1": (good, latin1, "is not UTF-8 text (byte 3"),
    }
    before = snapshot(tmp_path)
    running = {name: run_script(f"--checkpoint={checkpoint}", f"--text_file={path}",
                                f"--out={tmp_path / ('out_' + name)}")
               for name, (checkpoint, path, _) in cases.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=180)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 2 and out == "", (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][2] in lines[0], (name, lines[0])
    assert snapshot(tmp_path) == before  # no out folder, nothing else touched


@pytest.mark.slow  # 1-2 minutes: two trainings, an evaluation, sampling and an analysis
def test_a_bpe_run_trains_resumes_evaluates_samples_and_is_analysed(tmp_path):
    corpus = write_text(tmp_path / "corpus.txt", num_lines=500)
    with open(corpus, "a", encoding="utf-8") as file:
        file.write("héllo wörld 日本語 😀 to be\n" * 40)
    config = tiny.get_config("margin")
    config.data.update(text_file=str(corpus), tokenizer="bpe", vocab_size=300,
                       cache_dir=str(tmp_path / "cache"))
    config.update(num_steps=4, eval_every=2, checkpoint_every=2, log_every=2, progress=False,
                  peak_flops=1e11)
    config.optimizer.decay_steps = 6
    workdir = tmp_path / "run"
    first = train_and_evaluate(config, workdir)
    assert (workdir / "tokenizer.json").is_file() and not (workdir / "vocab.json").exists()
    assert first["step"] == 4 and "val_bits_per_token" in first and "val_bpc" not in first
    config.num_steps = 6
    summary = train_and_evaluate(config, workdir)
    assert summary["step"] == 6
    assert metrics.read_metrics(workdir, split="setup")[-1]["step"] == 4  # resumed
    # bits per byte = nats per token / ln 2 x tokens / bytes of the same windows
    results = evaluate.evaluate_workdir(workdir, sigmas=(0.0,), max_batches=2,
                                        margin_batches=1, margin_batch_size=2,
                                        support_windows=1)
    clean = results["splits"]["validation"]["clean"]
    assert clean["bpb"] == pytest.approx(clean["ce_nats"] / math.log(2) * clean["num_tokens"]
                                         / clean["num_bytes"], rel=1e-9)
    assert clean["bits_per_token"] == pytest.approx(summary["val_bits_per_token"], rel=1e-5)
    assert clean["bpb"] == pytest.approx(summary["val_bpb"], rel=1e-5)
    model, tokenizer, _ = restore.load_checkpoint(workdir)
    text = sampling.sample(model, tokenizer, "héllo", num_tokens=10, seed=2)
    assert text == sampling.sample(model, tokenizer, "héllo", num_tokens=10, seed=2)
    assert len(tokenizer.encode("héllo" + text)) >= 10
    analysed = analyze.analyze(workdir, corpus, tmp_path / "analysis", max_tokens=40,
                               progress=False)
    assert analysed["checkpoint"] == "run at step 6" and len(analysed["layers"]) == 2
