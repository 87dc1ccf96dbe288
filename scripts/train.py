"""Train a model: ``python scripts/train.py --config=configs/tiny.py:margin --workdir=DIR``.

Rerunning with the same workdir resumes from its latest checkpoint. Override any config key
with ``--config.key=value`` (e.g. ``--config.data.text_file=input.txt``).
"""

import _bootstrap  # noqa: F401  (repo root on sys.path)
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from stm_jax import train

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the vocabulary.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if FLAGS.config.get("distributed", False):
        jax.distributed.initialize()
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(lambda argv: _bootstrap.run_main(main, argv))
