"""``load_trained(workdir)``: the model a training run left in its workdir, read-only;
``load_checkpoint(path)``: that, or a Hugging Face GPT-2 directory, with its tokenizer.

Evaluation and sampling need the exact model training produced: the config it ran with
(``config.json``, which holds the vocabulary size filled in from the data), the vocabulary that
gives its token ids their text (``vocab.json``, or ``tokenizer.json`` for a subword run) and
the parameters of a checkpoint. The checkpoint is checked against the same metadata training
writes (model shape and vocabulary) before any array is read, so a workdir whose files disagree
fails with a sentence, not a shape error.

Nothing in the workdir is created, modified or deleted: a missing file is an error naming it,
and the checkpoint manager is opened only on a directory that already exists, without async
saves, and never asked to save.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from flax import nnx

from stm_jax import data, files, objective, pretrained
from stm_jax import model as model_lib
from stm_jax.errors import UserError
from stm_jax.trainer import checkpointing, steps
from stm_jax.trainer.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    checkpoint_metadata,
    read_config,
    upgrade_metadata,
)


def read_vocab(workdir: Path, config) -> data.Vocab | data.BPETokenizer:
    """The training vocabulary (``vocab.json``, or a subword run's ``tokenizer.json``); its
    size must be the model's, or ids would mean other text."""
    kind = data.Vocab if config.data.tokenizer == "char" else data.BPETokenizer
    path = workdir / kind.filename
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; the checkpoints cannot be decoded without the vocabulary "
            f"they were trained with. Restore the original {kind.filename}."
        )
    vocab = kind.load(path)
    if vocab.size != config.model.vocab_size:
        raise UserError(
            f"{path} has {vocab.size} ids but {workdir / CONFIG_FILE} says "
            f"model.vocab_size={config.model.vocab_size}; the two files come from different runs."
        )
    return vocab


def _choose_step(ckpt: checkpointing.Checkpointer, step: int | None, directory: Path) -> int:
    available = ckpt.all_steps()
    if not available:
        raise UserError(
            f"{directory} holds no complete checkpoint yet; train first (checkpoints are "
            "written every config.checkpoint_every steps and at the end of a run)."
        )
    if step is None:
        return available[-1]
    if step not in available:
        raise UserError(f"there is no checkpoint of step {step} in {directory}; "
                        f"complete steps: {available}")
    return step


def _abstract_state(config):
    """Shapes and dtypes of the train state, placed on one device, without initialising it."""
    tx = steps.make_optimizer(config.optimizer, config.num_steps)
    shapes = jax.eval_shape(lambda: steps.init_state(config, tx)[1])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def build_model(config, params: dict) -> model_lib.GPT:
    """A GPT of ``config.model`` holding ``params`` (a pure dict, as the train state stores)."""
    abstract = nnx.eval_shape(lambda: model_lib.init_model(
        config.model, config.seed, objective.prior_width(config.objective, config.model)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, params)


def load_trained(
    workdir: str | Path, step: int | None = None
) -> tuple[model_lib.GPT, ml_collections.ConfigDict, data.Vocab | data.BPETokenizer,
           int]:
    """(model, config, vocab, step) from ``workdir``'s latest checkpoint, or from ``step``.

    Raises :class:`~stm_jax.errors.UserError` for a workdir without config.json, vocab.json
    or any checkpoint, for a step that is not there, and (``checkpointing.CheckpointError``)
    for a checkpoint that belongs to another model or cannot be read.
    """
    workdir = files.as_path(workdir)  # local, or a bucket (gs://)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist or is not a directory")
    config = read_config(workdir)
    vocab = read_vocab(workdir, config)
    directory = workdir / CHECKPOINT_DIR
    if not directory.is_dir():  # the Checkpointer would create it
        raise UserError(
            f"{workdir} has no {CHECKPOINT_DIR}/ folder: no checkpoint was saved yet. Train "
            "first, or pass the workdir of a finished run."
        )
    with checkpointing.Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        step = _choose_step(ckpt, step, directory)
        state, _ = ckpt.restore(step, _abstract_state(config),
                                expected_metadata=checkpoint_metadata(config, vocab),
                                upgrade_metadata=upgrade_metadata)
    return build_model(config, state["params"]), config, vocab, int(step)


def load_checkpoint(
    path: str | Path, *, tokenizer: str | Path | None = None, step: int | None = None
) -> tuple[model_lib.GPT, data.Vocab | data.BPETokenizer, str]:
    """(model, tokenizer, description) of a training workdir or a Hugging Face GPT-2 directory.

    A GPT-2 directory's tokenizer is its own ``tokenizer.json`` unless ``tokenizer`` names
    another; its size must be the checkpoint's vocabulary. A workdir's tokenizer is its own
    (``tokenizer`` must then be the same file, if given).
    """
    path = Path(path).expanduser()
    if not pretrained.is_gpt2_dir(path):
        model, _, vocab, step = load_trained(path, step)
        if tokenizer is not None and data.BPETokenizer.load(tokenizer) != vocab:
            raise UserError(f"{tokenizer} is not the tokenizer {path} was trained with; leave "
                            "--tokenizer out for a training workdir.")
        return model, vocab, f"{path.name} at step {step}"
    if step is not None:
        raise UserError(f"{path} is a GPT-2 directory, which has no steps; leave --step out.")
    tokenizer_path = Path(tokenizer).expanduser() if tokenizer else \
        path / pretrained.TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise UserError(f"{tokenizer_path} does not exist: {path} has no tokenizer.json; pass "
                        "the one the checkpoint was trained with as --tokenizer=PATH.")
    vocab = data.BPETokenizer.load(tokenizer_path)
    hf = pretrained.read_hf_config(path)
    if vocab.size != hf["vocab_size"]:
        raise UserError(f"{tokenizer_path} has {vocab.size:,} tokens but {path} has a "
                        f"vocabulary of {hf['vocab_size']:,}: they do not belong together; pass "
                        "the checkpoint's own tokenizer.json.")
    return pretrained.load_gpt2(path), vocab, f"GPT-2 {path.name}"
