"""A GPT-style decoder (pre-LN, learned positions, GELU MLP) in Flax NNX.

The module only owns parameters; attention is the pure function in ``attention.py``. The
attention input of layer l is u^l = LN(x^{l-1}), the latent that the probabilistic reading
models (math.md section 1). Dropout takes an explicit key, so a training step is a pure
function of (params, batch, key) and a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from stm_jax.core import attention, prior
from stm_jax.errors import UserError

LayerSet = Literal["embedding", "all"]
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class Record:
    """What a forward pass records per layer besides the logits (one request, not a flag per
    quantity threaded through every signature).

    scope: which Jacobian blocks, "head", "layer", "both" or "none".
    logdets: their log|det| and sign (for ``scope``).
    margins, gains: their sigma_min(J_t) and ||M_t||_2 (an SVD per token and block; with
      ``gram``, from Gram matrices: faster with gradients, as training's penalties need).
    layers: "all", or "embedding" for the first layer only.
    residuals: ||e_t||^2 = ||u_t - out_t||^2, the prior's squared error.
    hidden: the residual stream after each block, x^{l+1}: (L', B, T, d).
    spectra: a summary of each token's self-map eigenvalues (``self_map_spectrum``).
    positions: the blocks' statistics at these token indices only, (n,) shared or (B, n)
      per sequence.
    chunk_size: > 0 computes the log-dets in chunks of positions (bounded memory).
    inputs: the layer's attention input u^l, "input" (B, T, d), for work done outside the
      forward pass (the sampler's key-value cache, analyses chunked over positions).
    """

    scope: attention.Scope = "none"
    logdets: bool = True
    margins: bool = False
    gains: bool = False
    layers: LayerSet = "all"
    residuals: bool = False
    hidden: bool = False
    spectra: bool = False
    gram: bool = False
    positions: jax.Array | None = None
    chunk_size: int = 0
    inputs: bool = False

    def for_layer(self, index: int) -> Record:
        """What layer ``index`` records: everything asked, or nothing outside the layer set."""
        if self.layers == "all" or index == 0:
            return self
        return Record(layers=self.layers)


def validate_config(model_cfg) -> None:
    """Raise :class:`UserError` for a ``model`` config no model can be built from."""
    for key in ("num_layers", "num_heads", "d_model", "context", "mlp_ratio"):
        if not isinstance(model_cfg[key], int) or model_cfg[key] < 1:
            raise UserError(f"model.{key}={model_cfg[key]!r} must be a positive integer")
    if model_cfg.d_model % model_cfg.num_heads:
        raise UserError(f"model.d_model={model_cfg.d_model} is not divisible by "
                        f"model.num_heads={model_cfg.num_heads}; choose num_heads dividing it")
    if not 0.0 <= model_cfg.dropout < 1.0:
        raise UserError(f"model.dropout={model_cfg.dropout} must be in [0, 1)")
    if not 0 < model_cfg.layer_norm_eps < 1:
        raise UserError(f"model.layer_norm_eps={model_cfg.layer_norm_eps} must be in (0, 1)")
    if model_cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype={model_cfg.dtype!r}; expected one of {DTYPES}")
    if not model_cfg.embed_init_std > 0:
        raise UserError(f"model.embed_init_std={model_cfg.embed_init_std} must be positive")


def add_embedding_noise(x: jax.Array, noise: jax.Array, sigma, relative) -> jax.Array:
    """``x + sigma * noise``, the noise scaled by each token's RMS when ``relative``.

    ``x`` is a latent such as ``GPT.embed(tokens)``, (B, T, d); ``noise`` a standard-normal
    array of its shape. The RMS is held constant for the gradient (``stop_gradient``): a model
    trained with relative noise cannot escape it by shrinking its embeddings.
    """
    rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)))
    scale = sigma * jnp.where(relative, rms, jnp.ones_like(rms))
    return x + scale * noise.astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def at_least_float32(x: jax.Array) -> jax.Array:
    """Softmax, losses and determinants run in float32 even when matmuls run in bfloat16."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_norm(cfg, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The model's LayerNorm: epsilon ``model.layer_norm_eps`` (GPT-2: 1e-5)."""
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, use_bias=cfg.use_bias,
                         rngs=rngs)


def _split_or_none(key: jax.Array | None, num: int) -> list:
    return [None] * num if key is None else list(jax.random.split(key, num))


class Block(nnx.Module):
    """One pre-LN transformer block whose attention weights feed the pure attention function."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, norm_input: bool = True):
        d, heads, head_dim = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
        std, proj_std = 0.02, 0.02 / (2 * cfg.num_layers) ** 0.5  # nanoGPT's initialisation
        normal = lambda shape, s: nnx.Param(s * jax.random.normal(rngs.params(), shape))  # noqa: E731
        self.ln_attn = layer_norm(cfg, rngs)
        self.wq = normal((d, heads, head_dim), std)
        self.wk = normal((d, heads, head_dim), std)
        self.wv = normal((d, heads, head_dim), std)
        self.wo = normal((heads, head_dim, d), proj_std)
        if cfg.attention_bias:  # GPT-2's q, k, v and output biases (core/attention.py)
            zeros = lambda shape: nnx.Param(jnp.zeros(shape))  # noqa: E731
            self.bq, self.bk, self.bv = (zeros((heads, head_dim)) for _ in range(3))
            self.bo = zeros((d,))
        self.attention_bias = cfg.attention_bias
        self.ln_mlp = layer_norm(cfg, rngs)
        init = nnx.initializers.normal(std)
        self.fc = nnx.Linear(d, cfg.mlp_ratio * d, use_bias=cfg.use_bias, kernel_init=init,
                             rngs=rngs)
        self.proj = nnx.Linear(cfg.mlp_ratio * d, d, use_bias=cfg.use_bias,
                               kernel_init=nnx.initializers.normal(proj_std), rngs=rngs)
        self.dropout_rate = cfg.dropout
        # False (model.first_layer_norm for block 0): attention reads x itself, so the
        # barrier's blocks are those of the raw embeddings; ln_attn stays (unused) so that
        # the parameter tree is the same either way.
        self.norm_input = norm_input

    def attention_params(self, dtype=None) -> dict:
        names = ("wq", "wk", "wv", "wo") + (("bq", "bk", "bv", "bo") if self.attention_bias
                                            else ())
        params = {name: getattr(self, name)[...] for name in names}
        return params if dtype is None else jax.tree.map(lambda w: w.astype(dtype), params)

    def __call__(self, x, *, record: Record, dtype, key):
        """x: (B, T, d) -> (x', stats dict of this layer's per-token statistics)."""
        attn_key, mlp_key = _split_or_none(key, 2)
        u = (self.ln_attn(x) if self.norm_input else x).astype(dtype)
        params = self.attention_params(dtype)
        positions = record.positions
        per_sequence = positions is not None and positions.ndim == 2  # (B, n), else (n,)
        attend = jax.vmap(lambda seq, seq_positions: attention.causal_self_attention(
            params, seq, scope=record.scope if record.logdets else "none",
            positions=seq_positions, chunk_size=record.chunk_size,
            singular_scope=record.scope, with_margins=record.margins,
            with_gains=record.gains, with_spectra=record.spectra, gram=record.gram),
            in_axes=(0, 0 if per_sequence else None))
        out, jac = attend(u, positions)
        stats = {name: value for name, value in jac._asdict().items() if value is not None}
        if record.residuals:
            residual = at_least_float32(u - out)
            stats["residual_sq"] = jnp.sum(residual**2, axis=-1)  # ||e_t||^2, (B, T)
        if record.inputs:
            stats["input"] = u
        x = x + dropout(out.astype(x.dtype), self.dropout_rate, attn_key)
        x = x + dropout(self.mlp(x, dtype).astype(x.dtype), self.dropout_rate, mlp_key)
        if record.hidden:
            stats["hidden"] = x
        return x, stats

    def mlp(self, x, dtype):
        """The MLP branch fc -> GELU (tanh) -> proj of LN(x), x: (..., d)."""
        # On (B T, d) rows: with 3-D activations XLA transposes the (B T, 4d) hidden gradient
        # (GELU's backward included) for the weight gradient, a large part of a CE step on CPU
        # (the README's performance notes).
        rows = self.ln_mlp(x).astype(dtype).reshape(-1, x.shape[-1])
        return self.proj(jax.nn.gelu(self.fc(rows))).reshape(x.shape)


class EmbeddingPrior(nnx.Module):
    """The embedding prior's parameters (``core/prior.py`` holds its mathematics): a separate,
    strictly causal attention over the layer-0 embeddings that the language model never reads.
    ``width`` < d adds a learned projection to ``width`` dimensions."""

    def __init__(self, d: int, width: int, *, rngs: nnx.Rngs):
        params = prior.init_prior_params(rngs.params(), d, width, project=width != d)
        self.wq, self.wk = nnx.Param(params["wq"]), nnx.Param(params["wk"])
        self.proj = nnx.Param(params["proj"]) if "proj" in params else None
        self.log_noise_scale = nnx.Param(jnp.zeros(()))  # log sigma of its squared error

    def params(self) -> dict:
        params = {"wq": self.wq[...], "wk": self.wk[...]}
        return params if self.proj is None else {**params, "proj": self.proj[...]}

    @property
    def width(self) -> int:
        return self.wq.shape[0]

    def __call__(self, x0: jax.Array, *, positions: jax.Array | None = None,
                 logdets: bool = True, margins: bool = False, gains: bool = False,
                 gram: bool = False) -> dict:
        """``prior.prior_stats`` of each sequence of ``x0: (B, T, d)``; ``positions`` (n,) or
        (B, n) per sequence. Arrays (B, n), "residual_sq" (B, T)."""
        params = self.params()
        per_sequence = positions is not None and positions.ndim == 2
        return jax.vmap(lambda seq, seq_positions: prior.prior_stats(
            params, seq, positions=seq_positions, logdets=logdets, margins=margins,
            gains=gains, gram=gram), in_axes=(0, 0 if per_sequence else None))(x0, positions)


class GPT(nnx.Module):
    """Decoder-only language model. ``cfg`` is the ``model`` sub-config (see configs/).

    ``prior_width`` > 0 adds an ``EmbeddingPrior`` of that width (``objective.prior_width``).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, prior_width: int = 0):
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"model.d_model={cfg.d_model} is not divisible by "
                             f"model.num_heads={cfg.num_heads}")
        self.context, self.dropout_rate = cfg.context, cfg.dropout
        self.tie_embeddings = cfg.tie_embeddings
        self.dtype_name = str(cfg.dtype)
        init = nnx.initializers.normal(0.02)
        embed_init = nnx.initializers.normal(cfg.embed_init_std)  # token and position tables
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init,
                                     rngs=rngs)
        self.position_embed = nnx.Param(embed_init(rngs.params(), (cfg.context, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs, norm_input=cfg.first_layer_norm or i > 0)
                                for i in range(cfg.num_layers)])
        self.ln_final = layer_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False,
                                      kernel_init=init, rngs=rngs)
        # log sigma_l of the hierarchical prior, one per layer (math.md section 5).
        self.log_noise_scale = nnx.Param(jnp.zeros((cfg.num_layers,)))
        # Last, so that the model's own parameters are drawn as without it.
        self.prior = EmbeddingPrior(cfg.d_model, prior_width, rngs=rngs) if prior_width else None

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype_name)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """The layer-0 latent: token + position embedding, (B, T, d)."""
        num_tokens = tokens.shape[-1]
        if num_tokens > self.context:
            raise ValueError(f"sequence length {num_tokens} exceeds model.context={self.context}")
        return self.token_embed(tokens) + self.position_embed[:num_tokens]

    def from_embeddings(
        self,
        x: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        record: Record = Record(),
        start_layer: int = 0,
    ) -> tuple[jax.Array, dict]:
        """Logits (B, T, V) and the per-layer statistics ``record`` asks for, stacked on a
        leading layer axis: {name: (L', B, ...)}, e.g. "logdet" (L', B, T) and "head_logdet"
        (L', B, H, T), where L' counts the layers in ``record.layers``.

        ``start_layer`` = l > 0 reads ``x`` as the residual stream entering block l (the
        "hidden" of block l - 1) and runs blocks l, l + 1, ... only.
        """
        embed_key, *block_keys = _split_or_none(dropout_key, 1 + len(self.blocks))
        if start_layer == 0:
            x = dropout(x, self.dropout_rate, embed_key)
        per_layer = []
        for index, (block, key) in enumerate(zip(self.blocks, block_keys, strict=True)):
            if index < start_layer:
                continue
            x, stats = block(x, record=record.for_layer(index), dtype=self.compute_dtype,
                             key=key)
            if stats:
                per_layer.append(stats)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else {}
        return self.logits(x), stacked

    def logits(self, x: jax.Array) -> jax.Array:
        """The output head on the last block's output x: (..., d) -> (..., V), float32."""
        x = self.ln_final(x)
        if self.tie_embeddings:
            embedding = self.token_embed.embedding[...].astype(self.compute_dtype)
            logits = x.astype(self.compute_dtype) @ embedding.T
        else:
            logits = self.lm_head(x.astype(self.compute_dtype))
        return at_least_float32(logits)

    def residual_stream(self, x: jax.Array, layer: int) -> jax.Array:
        """x^layer: the residual stream entering block ``layer`` from x0 (no dropout)."""
        for block in list(self.blocks)[:layer]:
            x, _ = block(x, record=Record(), dtype=self.compute_dtype, key=None)
        return x

    def __call__(self, tokens: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
        return self.from_embeddings(self.embed(tokens), **kwargs)


def init_model(model_cfg, seed: int, prior_width: int = 0) -> GPT:
    return GPT(model_cfg, rngs=nnx.Rngs(params=seed), prior_width=prior_width)
