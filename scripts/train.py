"""Train a model: ``python scripts/train.py --config=configs/tiny.py:margin --workdir=DIR``.

Rerunning with the same workdir resumes from its latest checkpoint. Override any config key
with ``--config.key=value`` (e.g. ``--config.data.text_file=input.txt``). SIGTERM or Ctrl-C
saves the current step and exits with code 0 (run the same command to resume); a second one
exits at once. Errors you can fix are one ``error: ...`` line on stderr and exit code 2.

Several devices: ``--config.mesh.fsdp=-1`` (or ``mesh.data``, ``mesh.model``). Several
processes: the same command on each, with ``--config.distributed.enabled=True`` on a TPU pod
(or under Slurm or MPI), or ``--config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I`` (README).
"""

import _bootstrap  # repo root on sys.path, one-line errors
from absl import app, flags, logging
from ml_collections import config_flags

from stm_jax.trainer import multihost
from stm_jax.trainer.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the vocabulary.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    multihost.initialize(FLAGS.config.distributed)  # before anything touches a device
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    _bootstrap.run(main)
