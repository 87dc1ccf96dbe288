"""The paper's setting: a small character-level GPT on WikiText-2 (raw).

Same model and schedule as ``shakespeare_char.py:cpu`` by default (``:full`` for the
nanoGPT-sized model). WikiText-2's raw train split is 10.9 MB; offline it is usually missing:
``--config.data.wikitext_proxy=True`` trains on wiki.test.raw and validates on
wiki.valid.raw, and every report says so. Objectives ``:ce``, ``:margin``, ``:map``.

Expected at ``:cpu`` size: about as long as shakespeare_char:cpu (see the README).
"""

from configs import common, shakespeare_char


def get_config(arg: str | None = None):
    size, objective_variant = common.parse_variants(arg, sizes=("cpu", "full"))
    config = shakespeare_char.get_config(
        ",".join(w for w in ("cpu" if size != "full" else "", objective_variant) if w))
    config.data.name = "wikitext2_raw"
    config.data.split_style = ""
    return config
