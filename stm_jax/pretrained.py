"""GPT-2 checkpoints in Hugging Face's layout: ``load_gpt2(path)`` and ``export_gpt2(model, path)``.

A Hugging Face GPT-2 directory holds ``config.json`` and ``model.safetensors`` (and usually
the ``tokenizer.json`` it was trained with). Transformers 5 has no Flax classes any more, so the
weights are read here with ``safetensors``' NumPy API (no torch) into the NNX ``GPT``: GPT-2 is
that model with ``attention_bias`` and ``use_bias`` on, LayerNorm epsilon
``layer_norm_epsilon``, tanh GELU (``jax.nn.gelu``'s default), tied embeddings and
``context = n_positions``.

Layout. GPT-2's ``Conv1D`` weights are (in, out): ``c_attn.weight`` (d, 3d) holds W_Q, W_K, W_V
side by side, head h in columns ``h p .. (h + 1) p`` of each; ``attn.c_proj.weight`` (d, d) is
W_O with rows in the same order. So ``wq = c_attn.weight[:, :d].reshape(d, H, p)`` and
``wo = c_proj.weight.reshape(H, p, d)``: the same numbers, no transposes. The prior's noise
scales, which GPT-2 has none of, start at zero (sigma = 1).

Every mistake in the directory (a missing or truncated file, a config that is not GPT-2's, a
tensor of the wrong shape) is a :class:`~stm_jax.errors.UserError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from stm_jax import files
from stm_jax import model as model_lib
from stm_jax.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# GPT-2's GELU is the tanh approximation under each of these names (transformers' ACT2FN).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_PREFIX = "transformer."  # GPT2LMHeadModel.save_pretrained's names; the original hub files lack it


# ---------------------------------------------------------------------------------------------
# config.json


def is_gpt2_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face directory rather than a training workdir (whose
    config.json has no ``model_type``)."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and (
        (path / WEIGHTS_FILE).exists() or _hf_model_type(path / CONFIG_FILE) is not None)


def _hf_model_type(config_path: Path) -> str | None:
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def read_hf_config(path: str | os.PathLike) -> dict:
    """``path/config.json`` as a dict, checked to describe a GPT-2 this module can load."""
    config_path = Path(path).expanduser() / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{config_path} does not exist; pass a Hugging Face GPT-2 directory "
                        f"(config.json and {WEIGHTS_FILE}).")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{config_path} is not readable JSON ({error}); restore the file.") \
            from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise UserError(f"{config_path} describes model_type={found!r}, not 'gpt2'; only "
                        "GPT-2 checkpoints can be loaded.")
    required = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
    missing = [key for key in required if not isinstance(hf.get(key), int) or hf[key] < 1]
    if missing:
        raise UserError(f"{config_path} lacks positive integers for {missing}; it is not a "
                        "complete GPT-2 config.")
    d = hf["n_embd"]
    inner = hf.get("n_inner") or 4 * d
    activation = hf.get("activation_function", "gelu_new")
    problems = []
    if d % hf["n_head"]:
        problems.append(f"n_embd={d} is not divisible by n_head={hf['n_head']}")
    if inner % d:
        problems.append(f"n_inner={inner} is not a multiple of n_embd={d}")
    if activation not in TANH_GELUS:
        problems.append(f"activation_function={activation!r} is not tanh GELU {TANH_GELUS}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        problems.append("attention scores are not scaled by 1/sqrt(head dim) alone")
    if problems:
        raise UserError(f"{config_path}: {'; '.join(problems)}; stm_jax's GPT cannot represent "
                        "this model.")
    return hf


def model_config(hf: dict) -> ml_collections.ConfigDict:
    """The ``model`` config section of a GPT-2 (every key of configs/common.py's)."""
    d = hf["n_embd"]
    return ml_collections.ConfigDict(dict(
        num_layers=hf["n_layer"], num_heads=hf["n_head"], d_model=d,
        context=hf["n_positions"], dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        mlp_ratio=(hf.get("n_inner") or 4 * d) // d, dtype="float32",
        vocab_size=hf["vocab_size"], attention_bias=True,
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), first_layer_norm=True,
        embed_init_std=float(hf.get("initializer_range", 0.02)),
    ))


# Model keys a GPT-2 directory fixes (the rest, dropout and dtype, are the run's choice).
ARCHITECTURE_KEYS = ("num_layers", "num_heads", "d_model", "tie_embeddings", "use_bias",
                     "mlp_ratio", "vocab_size", "attention_bias", "layer_norm_eps")


# ---------------------------------------------------------------------------------------------
# model.safetensors


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} does not exist; a GPT-2 directory needs its weights as "
                        f"{WEIGHTS_FILE} (convert a pytorch_model.bin with transformers first).")
    try:
        with safe_open(weights, framework="numpy") as file:
            return {_strip(name): file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise UserError(f"{weights} cannot be read ({' '.join(str(error).split())}); the file "
                        "is truncated or damaged: download it again.") from None


def _strip(name: str) -> str:
    return name.removeprefix(_PREFIX)


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, inner, vocab = cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (cfg.context, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.num_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, inner), f"h.{i}.mlp.c_fc.bias": (inner,),
            f"h.{i}.mlp.c_proj.weight": (inner, d), f"h.{i}.mlp.c_proj.bias": (d,),
        })
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def _check_tensors(tensors: dict, cfg, weights: Path) -> None:
    problems = []
    for name, shape in _expected_shapes(cfg).items():
        if name not in tensors:
            problems.append(f"{name} is missing")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, config.json "
                            f"implies {shape}")
        elif not np.issubdtype(tensors[name].dtype, np.floating):
            problems.append(f"{name} has dtype {tensors[name].dtype}")
    if problems:
        listed = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if
                                           len(problems) > 3 else "")
        raise UserError(f"{weights} does not match its config.json: {listed}.")


def params_from_tensors(tensors: dict, cfg) -> dict:
    """The GPT's parameters (``nnx.to_pure_dict`` layout) from GPT-2's tensors, float32."""
    d, heads = cfg.d_model, cfg.num_heads
    p = d // heads
    f32 = lambda name: np.asarray(tensors[name], np.float32)  # noqa: E731
    blocks = {}
    for i in range(cfg.num_layers):
        h = f"h.{i}."
        c_attn, b_attn = f32(h + "attn.c_attn.weight"), f32(h + "attn.c_attn.bias")
        split = {name: (c_attn[:, j * d:(j + 1) * d].reshape(d, heads, p),
                        b_attn[j * d:(j + 1) * d].reshape(heads, p))
                 for j, name in enumerate("qkv")}
        blocks[i] = {
            "ln_attn": {"scale": f32(h + "ln_1.weight"), "bias": f32(h + "ln_1.bias")},
            **{f"w{n}": split[n][0] for n in "qkv"}, **{f"b{n}": split[n][1] for n in "qkv"},
            "wo": f32(h + "attn.c_proj.weight").reshape(heads, p, d),
            "bo": f32(h + "attn.c_proj.bias"),
            "ln_mlp": {"scale": f32(h + "ln_2.weight"), "bias": f32(h + "ln_2.bias")},
            "fc": {"kernel": f32(h + "mlp.c_fc.weight"), "bias": f32(h + "mlp.c_fc.bias")},
            "proj": {"kernel": f32(h + "mlp.c_proj.weight"), "bias": f32(h + "mlp.c_proj.bias")},
        }
    params = {
        "token_embed": {"embedding": f32("wte.weight")},
        "position_embed": f32("wpe.weight")[:cfg.context],
        "blocks": blocks,
        "ln_final": {"scale": f32("ln_f.weight"), "bias": f32("ln_f.bias")},
        "log_noise_scale": np.zeros((cfg.num_layers,), np.float32),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": f32("lm_head.weight").T}
    return params


def read_gpt2(path: str | os.PathLike, *, context: int | None = None
              ) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, parameters as a pure dict) of a GPT-2 directory.

    ``context`` < n_positions keeps the first ``context`` position embeddings (fine-tuning on
    shorter windows); the model config then says so.
    """
    path = Path(path).expanduser()
    hf = read_hf_config(path)
    cfg = model_config(hf)
    tensors = _read_tensors(path)
    _check_tensors(tensors, cfg, path / WEIGHTS_FILE)
    if context is not None:
        if not 1 <= context <= cfg.context:
            raise UserError(f"model.context={context} exceeds the checkpoint's n_positions="
                            f"{cfg.context}; use at most {cfg.context}.")
        cfg.context = context
    return cfg, params_from_tensors(tensors, cfg)


def build(cfg, params: dict) -> model_lib.GPT:
    """A GPT of ``cfg`` holding ``params`` (a pure dict), without a random initialisation."""
    abstract = nnx.eval_shape(lambda: model_lib.init_model(cfg, 0))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))


def load_gpt2(path: str | os.PathLike) -> model_lib.GPT:
    """The GPT-2 of a Hugging Face directory (config.json + model.safetensors) as a ``GPT``."""
    return build(*read_gpt2(path))


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(cfg) -> dict:
    """A GPT-2 config.json for the model config ``cfg``."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context, "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_ratio * cfg.d_model, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "initializer_range": 0.02,
    }


def tensors_from_params(params: dict, cfg) -> dict[str, np.ndarray]:
    """GPT-2's tensors (with the ``transformer.`` prefix) from the GPT's pure-dict parameters.

    Biases and LayerNorm offsets the model was built without are written as zeros, which is
    what the model computes; the prior's noise scales have no place in GPT-2 and are dropped.
    """
    d, heads = cfg.d_model, cfg.num_heads
    get = lambda tree, *keys: np.asarray(  # noqa: E731
        _lookup(tree, keys, default=np.zeros(d, np.float32)), np.float32)
    tensors = {"wte.weight": get(params, "token_embed", "embedding"),
               "wpe.weight": get(params, "position_embed"),
               "ln_f.weight": get(params, "ln_final", "scale"),
               "ln_f.bias": get(params, "ln_final", "bias")}
    for i, block in params["blocks"].items():
        h = f"h.{i}."
        zeros = np.zeros((heads, d // heads), np.float32)
        tensors.update({
            h + "ln_1.weight": get(block, "ln_attn", "scale"),
            h + "ln_1.bias": get(block, "ln_attn", "bias"),
            h + "attn.c_attn.weight": np.concatenate(
                [get(block, f"w{n}").reshape(d, d) for n in "qkv"], axis=1),
            h + "attn.c_attn.bias": np.concatenate(
                [np.asarray(block.get(f"b{n}", zeros), np.float32).reshape(d) for n in "qkv"]),
            h + "attn.c_proj.weight": get(block, "wo").reshape(d, d),
            h + "attn.c_proj.bias": get(block, "bo"),
            h + "ln_2.weight": get(block, "ln_mlp", "scale"),
            h + "ln_2.bias": get(block, "ln_mlp", "bias"),
            h + "mlp.c_fc.weight": get(block, "fc", "kernel"),
            h + "mlp.c_fc.bias": np.asarray(block["fc"].get(
                "bias", np.zeros(cfg.mlp_ratio * d)), np.float32),
            h + "mlp.c_proj.weight": get(block, "proj", "kernel"),
            h + "mlp.c_proj.bias": get(block, "proj", "bias"),
        })
    named = {_PREFIX + name: value for name, value in tensors.items()}
    if not cfg.tie_embeddings:
        named["lm_head.weight"] = get(params, "lm_head", "kernel").T
    return {name: np.ascontiguousarray(value) for name, value in named.items()}


def _lookup(tree, keys, default):
    for key in keys:
        if key not in tree:
            return default
        tree = tree[key]
    return tree


def model_cfg_of(model: model_lib.GPT) -> ml_collections.ConfigDict:
    """The architecture of a built GPT, read from its parameters."""
    first = model.blocks[0]
    heads, head_dim, d = first.wo[...].shape
    return ml_collections.ConfigDict(dict(
        num_layers=len(model.blocks), num_heads=heads, d_model=d, context=model.context,
        dropout=model.dropout_rate, tie_embeddings=model.tie_embeddings,
        use_bias=first.fc.bias is not None, mlp_ratio=first.fc.kernel[...].shape[1] // d,
        dtype=model.dtype_name, vocab_size=model.token_embed.num_embeddings,
        attention_bias=first.attention_bias, layer_norm_eps=first.ln_attn.epsilon,
        first_layer_norm=first.norm_input,
        embed_init_std=0.02))  # the initialisation's scale is not in the parameters


def export_gpt2(model: model_lib.GPT, path: str | os.PathLike) -> None:
    """Writes ``model`` as a Hugging Face GPT-2 directory: config.json and model.safetensors.

    Loading the result with ``load_gpt2`` gives the same parameters bit for bit (float32).
    Writes each file atomically; the folder is created if missing.
    """
    from safetensors.numpy import save

    cfg = model_cfg_of(model)
    if not cfg.first_layer_norm:
        raise UserError("a model whose first block reads the raw embeddings "
                        "(model.first_layer_norm=False) has no GPT-2 form; export only models "
                        "with every block's LayerNorm")
    params = nnx.to_pure_dict(nnx.split(model)[1])
    path = Path(path).expanduser()
    files.write_bytes(path / WEIGHTS_FILE, save(tensors_from_params(
        jax.tree.map(np.asarray, params), cfg), metadata={"format": "pt"}))
    files.write_json(path / CONFIG_FILE, hf_config(cfg), indent=2)
