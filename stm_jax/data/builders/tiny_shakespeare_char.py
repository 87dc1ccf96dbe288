"""`tiny_shakespeare_char`: Tiny Shakespeare as exact character splits, one example per split.

Two split conventions are in use in published character-level results, so both are builder
configs (and prepare into separate folders):

* ``nanogpt`` -- karpathy/nanoGPT ``shakespeare_char``: first 90% train, last 10% validation.
* ``tfds`` -- the TFDS ``tiny_shakespeare`` dataset: first 90% train, then the remainder halved
  into validation and test (1,003,854 / 55,770 / 55,770 characters).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from stm_jax.data.builders import common
from stm_jax.errors import UserError

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FILENAME = "input.txt"
# Also registered by TFDS's own `tiny_shakespeare` (1,115,394 bytes). Tests that use small
# synthetic files patch this table rather than switching verification off.
SHA256 = {FILENAME: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"}
MANUAL_SUBDIRS = ("tinyshakespeare",)
SPLIT_STYLES = ("nanogpt", "tfds")


def split_text(text: str, style: str) -> dict[str, str]:
    """Cuts the corpus into splits by character position, the way each convention does."""
    train_end = int(len(text) * 0.9)
    train, rest = text[:train_end], text[train_end:]
    if style == "nanogpt":
        return {"train": train, "validation": rest}
    if style == "tfds":
        half = int(len(rest) * 0.5)
        return {"train": train, "validation": rest[:half], "test": rest[half:]}
    raise ValueError(f"unknown tiny shakespeare split style {style!r}; use one of {SPLIT_STYLES}")


class TinyShakespeareChar(common.CharTextBuilder):
    """Tiny Shakespeare (karpathy/char-rnn input.txt), whole splits as single text examples."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="nanogpt", description="nanoGPT shakespeare_char: 90% train, 10% validation."
        ),
        tfds.core.BuilderConfig(
            name="tfds", description="TFDS tiny_shakespeare: 90% train, 5% validation, 5% test."
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {FILENAME} ({URL}) in manual_dir or in manual_dir/{MANUAL_SUBDIRS[0]}/."
    )
    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/karpathy/char-rnn/tree/master/data/tinyshakespeare"
    CITATION = """@misc{karpathy2015charrnn,
  author = {Karpathy, Andrej},
  title = {char-rnn},
  year = {2015},
  howpublished = {\\url{https://github.com/karpathy/char-rnn}}
}"""

    def _text_splits(self, dl_manager: tfds.download.DownloadManager) -> dict[str, str]:
        manual_dir = common.manual_dir_or_none(dl_manager)
        if manual_dir is None:
            path = common.download_first(dl_manager, [URL])
            source = f"{URL} (downloaded to {path})"
        else:
            found, missing = common.locate_files(manual_dir, [FILENAME], MANUAL_SUBDIRS)
            if missing:
                raise UserError(
                    f"{FILENAME} not found in manual_dir {manual_dir} (nor in "
                    f"{manual_dir / MANUAL_SUBDIRS[0]}). {self.MANUAL_DOWNLOAD_INSTRUCTIONS} "
                    "Or give no manual_dir to download it."
                )
            path = found[FILENAME]
            source = str(path)
        data = path.read_bytes()
        common.verify_sha256(data, SHA256[FILENAME], source)
        return split_text(common.decode_utf8(data, source), self.builder_config.name)
