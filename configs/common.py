"""Defaults shared by every config, and the variant syntax ``configs/x.py:variant,variant``.

Variants are comma-separated words: an objective ("ce", "margin", "map") and, where a config
offers them, a size ("cpu"). Override any key on the command line: ``--config.num_steps=10``.
"""

import ml_collections

from stm_jax import objective

OBJECTIVES = tuple(objective.VARIANTS)


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
    # gradient; activations of one microbatch live at a time). See stm_jax/accumulation.py.
    config.microbatches = 1

    config.model = ml_collections.ConfigDict(dict(
        num_layers=4, num_heads=4, d_model=128, context=64, dropout=0.0,
        tie_embeddings=True, use_bias=False, mlp_ratio=4,
        dtype="float32",  # matmul dtype; "bfloat16" on accelerators (softmax, losses,
                          # determinants stay float32)
        vocab_size=-1,  # filled in from the data
    ))
    config.objective = objective.objective_config(objective_variant)

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0,
        decay_steps=-1,  # cosine horizon; <= 0 means num_steps (nanoGPT's lr_decay_iters)
    ))
    config.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare", text_file="", val_fraction=0.1, split_style="nanogpt",
        data_dir="", manual_dir="", wikitext_proxy=False,
    ))

    config.log_every = 50
    config.eval_every = 250
    config.eval_batches = 20  # validation batches per evaluation during training
    config.checkpoint_every = 250
    config.keep_checkpoints = 3
    config.nonfinite_policy = "stop"  # "stop": halt, keep the last good checkpoint; "skip"
    config.distributed = False  # call jax.distributed.initialize() (multi-host)
    config.progress = True
    # MFU's denominator in FLOP/s. 0: a known accelerator's spec sheet, else a float32 matmul
    # measured at start (about 1.5 s on a 2-core CPU); set it to skip that or to fix the scale.
    config.peak_flops = 0.0
    return config
