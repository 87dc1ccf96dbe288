"""Fine-tune a pretrained GPT-2 on a text, with any objective (nanoGPT's finetune_shakespeare).

Needs a Hugging Face GPT-2 directory on disk (config.json, model.safetensors, tokenizer.json;
``gpt2`` by default, relative to the working directory; any size works, its config.json sets
the architecture). Tiny Shakespeare through its TFDS builder by default, or any UTF-8 file:

    python scripts/train.py --config=configs/gpt2_finetune.py:margin --workdir=runs/ft \\
        --config.init_from=path/to/gpt2 --config.data.tokenizer=path/to/gpt2/tokenizer.json \\
        --config.data.text_file=path/to/input.txt

Default (an accelerator; add ``--config.model.dtype=bfloat16``): nanoGPT's recipe, 20 steps
of 32 sequences of 1024 tokens (8 microbatches) at a constant learning rate of 3e-5, evaluated
every 5 steps (nanoGPT runs it from GPT-2 XL). ``:cpu`` shrinks it to a CPU-sized run: 4
sequences of 128 tokens, the barrier estimated on 1/16 of the positions (README, "Choosing a
barrier mode"). Objectives: ``:ce`` (default), ``:margin``, ``:map``. Compare runs by the
validation ``bpb`` (bits per byte), which does not depend on the tokenizer.
"""

from configs import common


def get_config(arg: str | None = None):
    size, objective_variant = common.parse_variants(arg, sizes=("cpu",))
    config = common.base_config(objective_variant)
    config.init_from = "gpt2"
    config.data.update(name="tiny_shakespeare", tokenizer="gpt2/tokenizer.json")
    # GPT-2 small; a checkpoint's config.json replaces these architecture keys.
    config.model.update(num_layers=12, num_heads=12, d_model=768, context=1024, dropout=0.0,
                        tie_embeddings=True, use_bias=True, attention_bias=True,
                        layer_norm_eps=1e-5, mlp_ratio=4)
    config.num_steps = 20
    config.optimizer.update(learning_rate=3e-5, min_learning_rate=3e-5, warmup_steps=0,
                            beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
    config.eval_every = config.checkpoint_every = 5
    config.keep_checkpoints = 1  # a GPT-2 train state is 3x the weights (Adam's moments)
    config.log_every = 1
    if size == "cpu":
        config.batch_size, config.microbatches = 4, 1
        config.model.context = 128
        config.eval_batches = 4
        config.objective.barrier_fraction = 1 / 16
    else:
        config.batch_size, config.microbatches = 32, 8
        config.eval_batches = 20
    return config
