"""GPT-2 checkpoints: ``load_gpt2`` against a NumPy forward pass written here, export then load
bitwise, the KV-cache sampler against the uncached forward pass, bad directories, and a
fine-tuning run (``config.init_from``) whose first step sees exactly the loaded model."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _gpt2_helpers import reference_logits, tiny_hf_config, write_gpt2_dir
from _train_helpers import write_text
from flax import nnx

from configs import common, gpt2_finetune, tiny
from stm_jax import data, pretrained
from stm_jax.data.tokenizer import BPETokenizer
from stm_jax.errors import UserError
from stm_jax.evaluation import sampling
from stm_jax.trainer import metrics
from stm_jax.trainer import restore as restore_lib
from stm_jax.trainer.loop import train_and_evaluate

VOCAB = 61


def pure(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model)[1]))


def assert_bitwise(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("tie,prefix", [(True, ""), (False, "transformer.")])
def test_load_gpt2_matches_a_numpy_forward_pass(tmp_path, tie, prefix):
    """Both the hub's names (no prefix) and save_pretrained's; tied and untied heads."""
    hf = tiny_hf_config(VOCAB, n_layer=3, n_head=4, n_embd=16, n_positions=20, tie=tie)
    tensors = write_gpt2_dir(tmp_path, hf, seed=1, prefix=prefix)
    model = pretrained.load_gpt2(tmp_path)
    assert model.context == 20 and model.tie_embeddings == tie
    assert model.blocks[0].ln_attn.epsilon == 1e-5 and model.blocks[0].attention_bias
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 20))
    logits, _ = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens))
    for row, ids in zip(np.asarray(logits), tokens, strict=True):
        expected = reference_logits(tensors, hf, ids)
        np.testing.assert_allclose(row, expected, atol=2e-4 * np.abs(expected).max(), rtol=0)


def test_export_then_load_is_bitwise(tmp_path):
    hf = tiny_hf_config(VOCAB, tie=False)
    write_gpt2_dir(tmp_path / "hf", hf, seed=2)
    model = pretrained.load_gpt2(tmp_path / "hf")
    pretrained.export_gpt2(model, tmp_path / "out")
    assert_bitwise(pure(model), pure(pretrained.load_gpt2(tmp_path / "out")))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["n_layer"] == 2 and exported["layer_norm_epsilon"] == 1e-5


def test_any_model_exports_as_the_same_function(tmp_path):
    """A character model without biases exports with zero biases: the same logits."""
    cfg = tiny.get_config().model
    cfg.vocab_size = VOCAB
    from stm_jax import model as model_lib

    model = model_lib.init_model(cfg, seed=3)
    pretrained.export_gpt2(model, tmp_path)
    loaded = pretrained.load_gpt2(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (1, cfg.context)))
    np.testing.assert_allclose(loaded(tokens)[0], model(tokens)[0], atol=1e-5)


def test_model_config_has_every_model_key():
    """A key added to configs/common.py's model section needs its GPT-2 value here."""
    gpt2 = pretrained.model_config(tiny_hf_config(VOCAB))
    assert set(gpt2) == set(common.base_config().model)


def test_kv_cache_logits_equal_the_uncached_forward_pass(tmp_path):
    """Prefill windows of 16 and 32 tokens, decoding up to the context of 40, and the refill
    with its last 20 tokens when it is full."""
    hf = tiny_hf_config(VOCAB, n_positions=40)
    write_gpt2_dir(tmp_path, hf, seed=4)
    model = pretrained.load_gpt2(tmp_path)
    tokens = np.random.default_rng(2).integers(0, VOCAB, 90)
    forward = nnx.jit(lambda m, x: m(x)[0][0])

    def last_logits(visible):  # right-padded to one shape: causal attention ignores the pad
        window = np.zeros(40, np.int32)
        window[:len(visible)] = visible
        return forward(model, jnp.asarray(window)[None])[len(visible) - 1]

    sampler = sampling.Sampler(model)
    np.testing.assert_allclose(sampler.start(tokens[:3]), last_logits(tokens[:3]), atol=1e-4)
    window_start, refills = 0, 0
    for position in range(3, 89):
        got = sampler.push(tokens[position])
        if position + 1 - window_start > 40:  # the sampler keeps the last half of the window
            window_start, refills = position + 1 - 20, refills + 1
        np.testing.assert_allclose(got, last_logits(tokens[window_start:position + 1]),
                                   atol=1e-4)
    assert refills == 3


def test_greedy_sampling_is_the_argmax_of_the_forward_pass(tmp_path):
    text = write_text(tmp_path / "t.txt", num_lines=50).read_text()
    tokenizer = BPETokenizer.train([text], 300)
    write_gpt2_dir(tmp_path / "hf", tiny_hf_config(tokenizer.size, n_positions=16), seed=5,
                   tokenizer_json=tokenizer.serialized)
    model, vocab, _ = restore_lib.load_checkpoint(tmp_path / "hf")
    out = sampling.sample(model, vocab, "to be", num_tokens=3, temperature=0)
    ids = list(vocab.encode("to be"))
    for _ in range(3):
        logits, _ = model(jnp.asarray(ids)[None])
        ids.append(int(np.argmax(logits[0, -1])))
    assert out == vocab.decode(np.asarray(ids[-3:]))


def test_bad_directories_are_one_user_error(tmp_path):
    hf = tiny_hf_config(VOCAB)
    write_gpt2_dir(tmp_path / "ok", hf)
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()
    cases = {"missing": None, "truncated": weights[:len(weights) // 2],
             "header": weights[:20]}
    for name, payload in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf))
        if payload is not None:
            (folder / "model.safetensors").write_bytes(payload)
        match = "does not exist" if payload is None else "truncated or damaged"
        with pytest.raises(UserError, match=match):
            pretrained.load_gpt2(folder)
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(UserError, match="model_type='llama', not 'gpt2'"):
        pretrained.load_gpt2(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**hf, "n_embd": 32}))
    with pytest.raises(UserError, match="does not match its config.json: wte.weight has shape"):
        pretrained.load_gpt2(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(
        {**hf, "activation_function": "relu"}))
    with pytest.raises(UserError, match="not tanh GELU"):
        pretrained.load_gpt2(tmp_path / "ok")


def test_fine_tuning_starts_from_the_checkpoint_and_resumes(tmp_path):
    corpus = write_text(tmp_path / "corpus.txt", num_lines=200)
    tokenizer = BPETokenizer.train([corpus.read_text()], 300)
    hf = tiny_hf_config(tokenizer.size, n_positions=24)
    write_gpt2_dir(tmp_path / "gpt2", hf, seed=6, tokenizer_json=tokenizer.serialized)
    config = gpt2_finetune.get_config("cpu,margin")
    config.init_from = str(tmp_path / "gpt2")
    config.data.update(text_file=str(corpus), tokenizer=str(tmp_path / "gpt2/tokenizer.json"),
                       cache_dir=str(tmp_path / "cache"))
    config.model.context = 16  # shorter than n_positions: the first 16 position embeddings
    config.update(num_steps=4, batch_size=8, eval_every=2, checkpoint_every=2, progress=False,
                  peak_flops=1e11)
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["status"] == "finished" and np.isfinite(summary["val_bpb"])
    # Step 1's loss is the loaded model's on step 0's batch: training started from GPT-2.
    splits, _, _ = data.load_dataset(config.data)
    inputs, targets = data.get_batch(splits["train"], seed=config.seed, step=0,
                                     batch_size=config.batch_size, context=16)
    model = pretrained.build(*pretrained.read_gpt2(tmp_path / "gpt2", context=16))
    logits, _ = model(jnp.asarray(inputs))
    ce = float(optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets).mean())
    first = metrics.read_metrics(tmp_path / "run", split="train")[0]
    assert first["step"] == 1 and first["ce"] == pytest.approx(ce, rel=1e-5)
    assert first["bits_per_token"] == pytest.approx(ce / math.log(2), rel=1e-5)
    # Resuming trains on from the checkpoint, not from GPT-2 again.
    config.num_steps = 6
    train_and_evaluate(config, tmp_path / "run")
    assert metrics.read_metrics(tmp_path / "run", split="setup")[-1]["step"] == 4
    trained, _, _ = restore_lib.load_checkpoint(tmp_path / "run")
    assert trained.context == 16 and trained.blocks[0].attention_bias


def test_fine_tuning_refuses_a_foreign_tokenizer(tmp_path):
    corpus = write_text(tmp_path / "corpus.txt", num_lines=100)
    write_gpt2_dir(tmp_path / "gpt2", tiny_hf_config(VOCAB))
    BPETokenizer.train([corpus.read_text()], 300).save(tmp_path / "other.json")
    config = tiny.get_config("margin")
    config.init_from = str(tmp_path / "gpt2")
    config.data.update(text_file=str(corpus), tokenizer=str(tmp_path / "other.json"),
                       cache_dir=str(tmp_path / "cache"))
    config.progress = False
    config.model.context = 16
    with pytest.raises(UserError, match=f"tokens but the checkpoint .* has a vocabulary of "
                                        f"{VOCAB}"):
        train_and_evaluate(config, tmp_path / "run")
    config.data.tokenizer = "bpe"
    with pytest.raises(UserError, match="needs the checkpoint's own tokenizer"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_matches_transformers_gpt2(tmp_path):
    """Opt-in: the same weights in transformers' GPT2LMHeadModel give the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = tiny_hf_config(VOCAB, n_layer=2, n_head=2, n_embd=16, n_positions=20)
    write_gpt2_dir(tmp_path, hf, seed=7)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 20))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    logits, _ = pretrained.load_gpt2(tmp_path)(jnp.asarray(tokens))
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())
    # And what export_gpt2 writes, transformers reads.
    pretrained.export_gpt2(pretrained.load_gpt2(tmp_path), tmp_path / "exported")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(tokens)).logits.numpy(), expected,
                                   atol=1e-5 * np.abs(expected).max())
