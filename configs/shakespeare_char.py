"""nanoGPT's shakespeare_char recipe on Tiny Shakespeare (90/10 split, character level).

Default: 6 layers, 6 heads, d = 384, context 256, batch 64, dropout 0.2, lr 1e-3 cosine to
1e-4 over 5000 steps, beta2 0.99. nanoGPT reports validation loss 1.4697 nats (2.12 BPC)
after about 3 minutes on an A100. It needs an accelerator.

``:cpu`` is nanoGPT's "I only have a CPU" recipe: 4 layers, 4 heads, d = 128, context 64,
batch 12, 2000 steps, no dropout; nanoGPT reports validation loss 1.88 nats. It trains in
minutes on a laptop CPU; the README's results table gives what stm_jax measured, and its
"Choosing a barrier mode" what each barrier mode costs per step.

Objectives: ``:ce`` (default), ``:margin`` (lambda_m = 0.02), ``:map``; combine as
``:cpu,margin``. Offline, point at the local file: ``--config.data.text_file=.../input.txt``
(the same 90/10 split) or ``--config.data.manual_dir=...`` for the TFDS builder.
"""

from configs import common


def get_config(arg: str | None = None):
    size, objective_variant = common.parse_variants(arg, sizes=("cpu",))
    config = common.base_config(objective_variant)
    config.data.name = "tiny_shakespeare"
    config.data.split_style = "nanogpt"
    if size == "cpu":
        config.num_steps = 2000
        config.batch_size = 12
        config.model.update(num_layers=4, num_heads=4, d_model=128, context=64, dropout=0.0)
        # Two microbatches of 6: the same gradient, and faster per step on a small CPU
        # (scripts/benchmark.py times both: modes "ce" and "ce_one_microbatch").
        config.microbatches = 2
        config.eval_every = 250
        config.eval_batches = 20
    else:
        config.num_steps = 5000
        config.batch_size = 64
        config.model.update(num_layers=6, num_heads=6, d_model=384, context=256, dropout=0.2)
        config.eval_every = 250
        config.eval_batches = 200
    config.optimizer.update(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                            beta2=0.99)
    config.log_every = 10 if size == "cpu" else 50
    config.checkpoint_every = config.eval_every
    return config
