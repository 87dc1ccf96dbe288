"""A tiny character model for tests, notebooks and smoke runs.

Expected: seconds on one CPU core for its 60 steps, most of it compiling; the loss falls
from ln(vocab) but the model learns little. Use with any text file:

    python scripts/train.py --config=configs/tiny.py:margin --workdir=runs/tiny \\
        --config.data.text_file=path/to/text.txt
"""

from configs import common


def get_config(arg: str | None = None):
    _, objective_variant = common.parse_variants(arg)
    config = common.base_config(objective_variant)
    config.num_steps = 60
    config.batch_size = 8
    config.model.update(num_layers=2, num_heads=2, d_model=32, context=32)
    config.optimizer.update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5)
    config.log_every = 10
    config.eval_every = 30
    config.eval_batches = 2
    config.checkpoint_every = 30
    return config
