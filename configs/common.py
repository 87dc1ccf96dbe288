"""Every setting a run reads, with its default, and the variant syntax ``configs/NAME.py:a,b``.

This file is the one place defaults live: stm_jax reads every key it needs from the config
and supplies none of its own. Variants are comma-separated words: an objective ("ce",
"margin", "map") and, where a config offers them, a size ("cpu"). Override any key on the
command line: ``--config.num_steps=10``. A config.json written before a key existed is
upgraded where it is read (``stm_jax/trainer/workdir.py``, ``LEGACY_VALUES``).
"""

import ml_collections

# The objective variants: lambda_m weighs the barrier, lambda_s the prior (docs/math.md
# section 5). "margin" is the paper's headline variant.
OBJECTIVE_VARIANTS = {
    "ce": {"lambda_m": 0.0, "lambda_s": 0.0},
    "margin": {"lambda_m": 0.02, "lambda_s": 0.0},
    "map": {"lambda_m": 0.02, "lambda_s": 0.01},
}
OBJECTIVES = tuple(OBJECTIVE_VARIANTS)


def parse_variants(arg: str | None, sizes: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """``"cpu,margin"`` -> (size "cpu", objective "margin"); objective defaults to "ce"."""
    words = [w for w in (arg or "").split(",") if w]
    unknown = [w for w in words if w not in sizes + OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown config variant(s) {unknown}; "
                         f"expected sizes {list(sizes)} and objectives {list(OBJECTIVES)}")
    chosen_sizes = [w for w in words if w in sizes]
    chosen_objectives = [w for w in words if w in OBJECTIVES]
    if len(chosen_sizes) > 1 or len(chosen_objectives) > 1:
        raise ValueError(f"config variant {arg!r} names more than one size or objective")
    return (chosen_sizes[0] if chosen_sizes else None,
            chosen_objectives[0] if chosen_objectives else "ce")


def base_config(objective_variant: str = "ce") -> ml_collections.ConfigDict:
    """Everything a training run reads, with nanoGPT-like defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_steps = 1000
    config.batch_size = 32  # global batch, split over all devices
    # Gradient accumulation: each step's batch in this many sequential microbatches (the same
    # gradient; activations of one microbatch live at a time). See stm_jax/trainer/accumulation.py.
    config.microbatches = 1

    config.model = ml_collections.ConfigDict(dict(
        num_layers=4, num_heads=4, d_model=128, context=64, dropout=0.0,
        tie_embeddings=True, use_bias=False, mlp_ratio=4,
        attention_bias=False,  # biases on q, k, v and the attention output (GPT-2 has them)
        layer_norm_eps=1e-6,  # GPT-2: 1e-5
        dtype="float32",  # matmul dtype; "bfloat16" on accelerators (softmax, losses,
                          # determinants stay float32)
        vocab_size=-1,  # filled in from the data
        # False: the first block's attention reads the raw x0 (no LayerNorm), so the barrier
        # on layer 0 acts on the raw embeddings (docs/math.md section 9).
        first_layer_norm=True,
        embed_init_std=0.02,  # token and position tables (nanoGPT's; nn.Embedding uses 1.0)
    ))
    config.objective = objective_config(objective_variant)

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0,
        decay_steps=-1,  # cosine horizon; <= 0 means num_steps (nanoGPT's lr_decay_iters)
        decay_embeddings=True,  # weight decay on the token and position tables too
    ))
    config.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare", text_file="", val_fraction=0.1, split_style="nanogpt",
        data_dir="", manual_dir="", wikitext_proxy=False,
        # "char", "bpe" (a byte-level BPE of vocab_size tokens trained on the train split) or
        # the path of a tokenizer.json (GPT-2's); subword splits are memory-mapped token files
        # in cache_dir ("" means ~/.cache/stm_jax/tokens), see stm_jax/data/corpus.py.
        tokenizer="char", vocab_size=8192, cache_dir="",
    ))

    # A Hugging Face GPT-2 directory to start from (its architecture replaces the model's;
    # data.tokenizer must be its tokenizer.json); "" trains from a random initialisation.
    config.init_from = ""

    config.log_every = 50
    config.eval_every = 250
    config.eval_batches = 20  # validation batches per evaluation during training
    config.checkpoint_every = 250
    config.keep_checkpoints = 3
    config.nonfinite_policy = "stop"  # "stop": halt, keep the last good checkpoint; "skip"
    # The device mesh, data x fsdp x model devices; -1 is the rest of them. data: the batch
    # split; fsdp: the batch and the parameters and optimizer state split; model: heads and
    # MLP hidden units split (stm_jax/trainer/sharding.py). The default is data parallelism.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    # Several processes (hosts), stm_jax/trainer/multihost.py: jax.distributed.initialize's
    # coordinator_address ("HOST:PORT"), num_processes and process_id, all given or all left
    # empty; with enabled=True and all empty, it detects them on TPU pods, Slurm and MPI.
    config.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=0, process_id=-1))
    config.progress = True
    # MFU's denominator in FLOP/s. 0: a known accelerator's spec sheet, else a float32 matmul
    # measured at start (a second or two on a CPU); set it to skip that or to fix the scale.
    config.peak_flops = 0.0
    return config


def objective_config(variant: str = "ce") -> ml_collections.ConfigDict:
    """The ``objective`` section for a named variant (see stm_jax/objective.py)."""
    if variant not in OBJECTIVE_VARIANTS:
        raise ValueError(f"unknown objective variant {variant!r}; expected one of "
                         f"{list(OBJECTIVE_VARIANTS)}")
    return ml_collections.ConfigDict(dict(
        variant=variant,
        layers="all",  # "all" or "embedding" (the first layer only)
        scope="head",  # "head": each head's diagonal block; "layer": the exact det J_t
        barrier_eps=1e-2,  # the smooth barrier is -log det above eps, quadratic below
        barrier_floor=float("-inf"),  # max(b, floor) per determinant; 0 stops at det = 1
        hyperprior_scale=1.0,  # log sigma_l ~ N(0, scale^2) for the prior's noise scales
        # The barrier's cost (README, "Choosing a barrier mode"): a random fraction of the
        # positions ("per_sequence" or "shared" subsets), of the steps (weighted 1/q), and
        # chunks of positions under jax.checkpoint (0: none).
        barrier_fraction=1.0,
        barrier_sampling="per_sequence",
        barrier_step_fraction=1.0,
        chunk_size=0,
        # The readings (docs/math.md sections 9-12). What the barrier is attached to: the
        # model's own attention blocks, or a separate prior over the raw embeddings
        # ("embedding_prior", of width prior_dim; 0: d_model, no projection).
        barrier_target="attention",
        prior_dim=0,
        # The penalty on each block J_t: "log_barrier" (the smooth -log det), "abs_log_capped"
        # (min(-log|det|, penalty_cap)), "margin_hinge" (relu(margin_tau - sigma_min)^2),
        # "small_gain" (-log(1 - ||M_t||), Taylor beyond small_gain_knee), "logdet_squared".
        penalty="log_barrier",
        penalty_cap=30.0,
        margin_tau=0.5,
        small_gain_knee=0.9,
        # Gaussian noise on x0 in training steps only: absolute, or relative to each token's
        # embedding RMS (held constant for the gradient). 0: off.
        train_noise_sigma=0.0,
        train_noise_mode="relative",
        fixed_noise_scale=0.0,  # the prior's sigma; 0: learned per layer
        **OBJECTIVE_VARIANTS[variant],
    ))
