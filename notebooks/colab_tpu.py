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
# # stm_jax on a Colab TPU
#
# Trains `configs/shakespeare_char.py` (nanoGPT's recipe) over every TPU core with FSDP: on a
# `(data, fsdp, model)` mesh of `1 x 8 x 1` (a TPU v2-8), the batch of 64 and every weight and
# its Adam moments are split across the cores (`config.mesh`; README, "Several devices and
# hosts"). In Colab choose *Runtime > Change runtime type > TPU*, then run all cells.
#
# **One flag**: `SMOKE_TEST = True` (or the environment variable `STM_JAX_NOTEBOOK_SMOKE=1`,
# which the test suite sets) runs the same code path on CPU with `configs/tiny.py` and a small
# generated text, without installing anything.

# %%
import os

SMOKE_TEST = os.environ.get("STM_JAX_NOTEBOOK_SMOKE", "0") == "1"
REPO_URL = "https://github.com/stm-jax/stm_jax.git"  # the project's repository; edit for a fork

# %% [markdown]
# ## Install (TPU runtime only)
# Clones the repository and installs it with its pinned JAX; on a TPU runtime `jax[tpu]` adds
# the TPU backend.

# %%
import subprocess
import sys
from pathlib import Path

if not SMOKE_TEST:
    if not Path("stm_jax").exists():
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, "stm_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "stm_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax[tpu]<0.10"], check=True)
    repo_root = Path("stm_jax").resolve()
else:
    import stm_jax

    repo_root = Path(stm_jax.__file__).resolve().parents[1]
sys.path.insert(0, str(repo_root))  # for `configs`

# %% [markdown]
# ## The devices
# On a TPU v2-8 this lists 8 cores; the global batch must be divisible by their number.

# %%
import jax

print(jax.devices())
print(f"{jax.device_count()} devices, platform {jax.devices()[0].platform}")

# %% [markdown]
# ## The config
# The full recipe on TPU; the tiny one in smoke mode. Tiny Shakespeare is downloaded and
# verified by the `tiny_shakespeare_char` TFDS builder on first use.

# %%
from configs import shakespeare_char, tiny

workdir = Path("runs") / ("colab_smoke" if SMOKE_TEST else "shakespeare_char_margin")
if SMOKE_TEST:
    config = tiny.get_config("margin")
    config.num_steps = 8
    config.batch_size = 4 * jax.device_count()
    text = Path("smoke_corpus.txt")
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog"
                              for i in range(400)))
    config.data.text_file = str(text)
else:
    config = shakespeare_char.get_config("margin")
    config.model.dtype = "bfloat16"  # matmuls in bf16; softmax, losses, determinants in f32
config.mesh.update(data=1, fsdp=-1, model=1)  # FSDP over every device
print(config.model)

# %% [markdown]
# ## The mesh
# Where a few parameters live: `fsdp` splits one large axis of each weight, vectors stay whole
# on every core (`stm_jax/trainer/sharding.py`). `mesh.model` would split the heads instead.

# %%
from stm_jax.trainer import sharding

mesh_shape = sharding.mesh_shape(config.mesh, jax.device_count())
print("mesh (data, fsdp, model):", mesh_shape)
d, heads = config.model.d_model, config.model.num_heads
for path, shape in {("blocks", "0", "wq"): (d, heads, d // heads),
                    ("blocks", "0", "fc", "kernel"): (d, config.model.mlp_ratio * d),
                    ("ln_final", "scale"): (d,)}.items():
    spec = sharding.param_spec(path, shape, dict(zip(sharding.AXES, mesh_shape, strict=True)))
    print(".".join(path), shape, spec)

# %% [markdown]
# ## Train
# Progress lines show the loss terms, BPC, tokens/s, model FLOPs utilisation and the ETA;
# everything also goes to `metrics.jsonl` and TensorBoard under the workdir. Rerunning the
# cell resumes from the latest checkpoint (Colab runtimes get preempted).

# %%
from stm_jax.trainer.loop import train_and_evaluate

summary = train_and_evaluate(config, workdir)
print(summary)
assert summary["status"] == "finished"

# %% [markdown]
# ## The metrics

# %%
from stm_jax.trainer import metrics

records = metrics.read_metrics(workdir, split="train")
print([(r["step"], round(r["loss"], 3)) for r in records])
assert records[-1]["step"] == config.num_steps
