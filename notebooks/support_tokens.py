# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Support tokens: where a trained model is closest to degeneracy
#
# Every attention layer gives every token $t$ a Jacobian block
# $J_t = \partial e_t / \partial u_t$ and a **margin to degeneracy**
# $m_t = \sigma_{\min}(J_t)$: how far the layer's map from noise to embeddings is from losing
# invertibility at that token. The tokens with the smallest margins are the **support
# tokens**: like the support vectors of an SVM, they are the ones the log-barrier pushes on.
#
# This notebook loads a trained model and shows, on validation text: the margins per token,
# the support tokens marked in the text, the margin distribution, and margins against the
# position in the window. The identities it relies on are checked with `assert`s.
#
# **Which model.** Set `STM_JAX_WORKDIR` to the workdir of a finished training run (for
# example `results/shakespeare_cpu/runs/margin_0.02/seed0` of `scripts/reproduce.py`; a
# relative data path in its `config.json` is read from the kernel's working directory, so
# start Jupyter where the run was launched). Without it, the notebook trains
# `configs/tiny.py:margin` for a few dozen steps on a short built-in text (about 20 s on one
# CPU core): enough to run every cell, too little to learn.

# %%
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import stm_jax
from stm_jax import data
from stm_jax.core import attention, barrier
from stm_jax.model import Record
from stm_jax.trainer.loop import train_and_evaluate
from stm_jax.trainer.restore import load_trained

sys.path.insert(0, str(Path(stm_jax.__file__).resolve().parents[1]))  # for `configs`
from configs import tiny

SONNETS = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wand'ring bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
"""


def train_tiny_model(folder: Path, num_steps: int = 30) -> Path:
    """configs/tiny.py:margin on the sonnets (four copies: the 10% validation tail must hold
    one evaluation batch of 8 windows of 32 characters)."""
    text_file = folder / "sonnets.txt"
    text_file.write_text(SONNETS * 4, encoding="utf-8")
    config = tiny.get_config("margin")
    config.data.text_file = str(text_file)
    config.update(num_steps=num_steps, eval_every=num_steps, checkpoint_every=num_steps,
                  progress=False)
    train_and_evaluate(config, folder / "run")
    return folder / "run"


workdir = os.environ.get("STM_JAX_WORKDIR") or train_tiny_model(Path(tempfile.mkdtemp()))
model, config, vocab, step = load_trained(workdir)
splits, _, info = data.load_dataset(config.data, workdir)  # reuses the run's vocab.json
print(f"model: {config.model.num_layers} layers, {config.model.num_heads} heads, "
      f"d = {config.model.d_model}, context {config.model.context}; step {step}; objective "
      f"{config.objective.variant} (lambda_m = {config.objective.lambda_m})")

# %% [markdown]
# ## 1. Margins of every token in a few validation windows
#
# `model(tokens, record=Record(scope="layer", margins=True))` returns per-layer statistics
# stacked on a leading layer axis: `margin` is $m_t$, `sign` the sign of $\det J_t$ (a token with
# $\det J_t \le 0$ has crossed the boundary: it is *infeasible*).

# %%
NUM_WINDOWS = 8
inputs, _ = next(data.eval_batches(splits["validation"], batch_size=NUM_WINDOWS,
                                   context=config.model.context))
_, stats = model(jnp.asarray(inputs), record=Record(scope="layer", margins=True))
margins = np.asarray(stats["margin"])  # (layers, windows, positions)
signs = np.asarray(stats["sign"])
print("margins:", margins.shape, "| smallest per layer:", margins.min(axis=(1, 2)).round(4),
      "| infeasible tokens:", int(np.sum(signs <= 0)))

# %% [markdown]
# ## 2. The margins are the autodiff Jacobian's smallest singular values
#
# The model computes $m_t$ from a closed form. The oracle: `jax.jacfwd` of the layer's
# residual map $u \mapsto u - \mathrm{attention}(u)$ (`attention.residual`) on the layer's
# actual input $u = \mathrm{LN}(x)$, the diagonal block $(t, t)$, and its SVD.

# %%
x = model.embed(jnp.asarray(inputs))
for layer, block in enumerate(model.blocks):
    params = block.attention_params()
    u = block.ln_attn(x)
    window = layer % NUM_WINDOWS
    jacobian = np.asarray(jax.jacfwd(lambda seq, p=params: attention.residual(p, seq))(u[window]))
    for t in (0, 1, config.model.context // 2, config.model.context - 1):
        oracle = np.linalg.svd(jacobian[t, :, t, :], compute_uv=False).min()
        assert np.isclose(margins[layer, window, t], oracle, rtol=1e-4, atol=1e-5), (layer, t)
    x, _ = block(x, record=Record(), dtype=jnp.float32, key=None)
print("closed-form margins = sigma_min of the autodiff Jacobian blocks, every layer")

# %% [markdown]
# ## 3. Support tokens in the text
#
# Two rules (`stm_jax.core.barrier`): the $k$ smallest margins of a window
# (`support_tokens_bottom_k`) and every token with $m_t \le \tau$
# (`support_tokens_threshold`); here $\tau$ is the 5% quantile of this layer's margins, so
# about one token in twenty qualifies. Under the text: `^` bottom-$k$, `*` below $\tau$.

# %%
LAYER, WINDOW, K = 0, 0, 4
tau = float(np.quantile(margins[LAYER], 0.05))
bottom_idx, _ = barrier.support_tokens_bottom_k(margins[LAYER, WINDOW], K)
below_tau = np.asarray(barrier.support_tokens_threshold(margins[LAYER, WINDOW], tau))
text = vocab.decode(inputs[WINDOW])
marks = [" "] * len(text)
for index in np.asarray(bottom_idx):
    marks[index] = "^"
for index in np.flatnonzero(below_tau):
    marks[index] = "*"
print("text  |" + text.replace("\n", "\u21b5"))
print("layer |" + "".join(marks))
for index in sorted(np.asarray(bottom_idx).tolist()):
    print(f"  position {index:>3} {text[index]!r}: m_t = {margins[LAYER, WINDOW, index]:.4f}")

# %%
fig, ax = plt.subplots(figsize=(10, 2.8), layout="constrained")
colors = ["tab:red" if i in set(np.asarray(bottom_idx).tolist()) else "tab:blue"
          for i in range(len(text))]
ax.bar(np.arange(len(text)), margins[LAYER, WINDOW], color=colors)
ax.set_xticks(np.arange(len(text)), [c if c != "\n" else "\u21b5" for c in text], fontsize=7)
low = margins[LAYER, WINDOW].min()
ax.set_ylim(low - 0.2 * (margins[LAYER, WINDOW].max() - low + 1e-6), None)
ax.set(ylabel="m_t", title=f"layer {LAYER}, window {WINDOW}: margins (red: bottom-{K})")
plt.show()

# %% [markdown]
# ## 4. The margin distribution

# %%
fig, axes = plt.subplots(1, len(margins), figsize=(4 * len(margins), 3), squeeze=False,
                         layout="constrained")
for layer, ax in enumerate(axes[0]):
    ax.hist(margins[layer].ravel(), bins=40)
    ax.set(title=f"layer {layer}", xlabel="m_t", ylabel="tokens")
plt.show()

# %% [markdown]
# ## 5. Margins against the position in the window
#
# At position 0 a token attends only to itself: $a_{00} = 1$, $o_0 = v_0$, and the terms that
# depend on the other tokens vanish, so
# $J_0 = I - \sum_h W_O^h W_V^h$, **the same matrix for every text**. Its margin is a
# property of the weights alone, identical in every window; if it is small, the support
# tokens pile up at window starts, whatever the text. The other positions vary with the text.

# %%
for layer, block in enumerate(model.blocks):
    w = block.attention_params()
    j0 = np.eye(config.model.d_model) - np.einsum("dhp,hpe->de", w["wv"], w["wo"]).T
    weights_only = np.linalg.svd(j0, compute_uv=False).min()
    np.testing.assert_allclose(margins[layer, :, 0], weights_only, rtol=1e-4, atol=1e-5)
print("m_0 equals sigma_min(I - sum_h W_O^h W_V^h) in every window and layer")

_, bottom_masks = barrier.support_tokens_bottom_k(margins, K)  # (layers, windows, positions)
share = np.asarray(bottom_masks).mean(axis=1)  # how often each position is a support token
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
for layer in range(len(margins)):
    mean = margins[layer].mean(axis=0)
    axes[0].plot(mean, marker=".", label=f"layer {layer}")
    axes[1].plot(share[layer], marker=".", label=f"layer {layer}")
axes[0].set(xlabel="position t", ylabel="mean m_t over windows", title="margin by position")
axes[1].set(xlabel="position t", ylabel=f"share of windows in bottom-{K}",
            title="where the support tokens are")
for ax in axes:
    ax.legend(fontsize=8)
plt.show()
print("share of windows where position 0 is a support token, per layer:", share[:, 0])

# %% [markdown]
# How to read it: where the left curve rises from position 0, the first few positions of every
# window hold the smallest margins, and the bottom-$k$ rule picks them in (nearly) every window
# (right). Those support tokens say more about the window than about the text: a token at
# position 0 sees no context, and its block is the weights' $I - \sum_h W_O^h W_V^h$. A
# barrier that pushes on them pushes on $W_O W_V$. When comparing support tokens between
# models (as `scripts/reproduce.py`'s `support_tokens.png` does), look past the first
# positions, or use the threshold rule.
