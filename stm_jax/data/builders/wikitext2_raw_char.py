"""`wikitext2_raw_char`: WikiText-2 (raw, v1) as exact character splits, one example per split.

Configs:

* ``full`` -- the official splits: ``wiki.train.raw`` / ``wiki.valid.raw`` / ``wiki.test.raw``.
* ``proxy`` -- for machines that have only the validation and test files (they are shared with
  WikiText-103 and often mirrored alone): train on ``wiki.test.raw``, validate on
  ``wiki.valid.raw``, no test split. Results on it are NOT WikiText-2 results and every report
  that uses it must say so.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import tensorflow_datasets as tfds

from stm_jax.data.builders import common
from stm_jax.errors import UserError

URLS = (
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
)
ARCHIVE_DIR = "wikitext-2-raw"  # the folder inside the zip
# Digests of the files inside the official archive (train: 10,940,747 bytes; valid: 1,146,846;
# test: 1,290,590). Tests that use small synthetic files patch this table.
SHA256 = {
    "wiki.train.raw": "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
    "wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}
SPLIT_FILES = {
    "full": {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"},
    "proxy": {"train": "wiki.test.raw", "validation": "wiki.valid.raw"},
}


class Wikitext2RawChar(common.CharTextBuilder):
    """WikiText-2 raw (Merity et al., 2016), whole splits as single text examples."""

    name = "wikitext2_raw_char"  # spelled out: it is the folder name under data_dir
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="Official train/validation/test."),
        tfds.core.BuilderConfig(
            name="proxy",
            description="Offline proxy: train = wiki.test.raw, validation = wiki.valid.raw.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the raw files of wikitext-2-raw-v1.zip (wiki.train.raw, wiki.valid.raw, "
        f"wiki.test.raw) in manual_dir or in manual_dir/{ARCHIVE_DIR}/."
    )
    DESCRIPTION = __doc__
    HOMEPAGE = "https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/"
    LICENSE = "Creative Commons Attribution-ShareAlike 3.0"
    CITATION = """@article{merity2016pointer,
  title = {Pointer Sentinel Mixture Models},
  author = {Merity, Stephen and Xiong, Caiming and Bradbury, James and Socher, Richard},
  journal = {arXiv preprint arXiv:1609.07843},
  year = {2016}
}"""

    def _text_splits(self, dl_manager: tfds.download.DownloadManager) -> dict[str, str]:
        split_files = SPLIT_FILES[self.builder_config.name]
        texts = self._read_raw_files(dl_manager, sorted(set(split_files.values())))
        return {split: texts[filename] for split, filename in split_files.items()}

    def _read_raw_files(
        self, dl_manager: tfds.download.DownloadManager, filenames: list[str]
    ) -> dict[str, str]:
        """Reads, verifies and decodes the raw files from manual_dir or the downloaded zip."""
        manual_dir = common.manual_dir_or_none(dl_manager)
        if manual_dir is None:
            blobs = _read_from_archive(common.download_first(dl_manager, URLS), filenames)
        else:
            blobs = self._read_from_manual_dir(manual_dir, filenames)
        texts = {}
        for filename, (data, source) in blobs.items():
            common.verify_sha256(data, SHA256[filename], source)
            texts[filename] = common.decode_utf8(data, source)
        return texts

    def _read_from_manual_dir(
        self, manual_dir: Path, filenames: list[str]
    ) -> dict[str, tuple[bytes, str]]:
        found, missing = common.locate_files(manual_dir, filenames, (ARCHIVE_DIR,))
        if missing:
            hint = ""
            if "wiki.train.raw" in missing:
                hint = (
                    " Without wiki.train.raw, the 'proxy' config trains on wiki.test.raw and "
                    "validates on wiki.valid.raw (not comparable with WikiText-2 results)."
                )
            raise UserError(
                f"{', '.join(missing)} not found in manual_dir {manual_dir} (nor in "
                f"{manual_dir / ARCHIVE_DIR}). {self.MANUAL_DOWNLOAD_INSTRUCTIONS} Or give no "
                f"manual_dir to download the archive.{hint}"
            )
        return {name: (path.read_bytes(), str(path)) for name, path in found.items()}


def _read_from_archive(archive: Path, filenames: list[str]) -> dict[str, tuple[bytes, str]]:
    """Reads members straight from the zip (TFDS's extractor would need TensorFlow)."""
    blobs = {}
    with zipfile.ZipFile(archive) as zf:
        for filename in filenames:
            member = f"{ARCHIVE_DIR}/{filename}"
            try:
                blobs[filename] = (zf.read(member), f"{archive}!{member}")
            except KeyError:
                raise UserError(
                    f"downloaded archive {archive} has no member {member}; it is not "
                    "wikitext-2-raw-v1.zip. Delete it and retry, or use manual_dir."
                ) from None
    return blobs
