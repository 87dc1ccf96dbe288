"""The trainer: ``train_and_evaluate(config, workdir)`` and what it is built from.

``loop`` (the training path), ``steps`` (optimizer and pure train/eval steps),
``accumulation`` (microbatches), ``sharding`` (the device mesh and the partition rules),
``multihost`` (several processes), ``checkpointing`` (Orbax), ``workdir`` (the run's folder, its
checks and lock), ``restore`` (loading a trained run), ``metrics`` (records and progress lines).
"""
