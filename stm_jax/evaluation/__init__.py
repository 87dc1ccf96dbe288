"""Measuring a trained run (``evaluate``: its report in ``report``, its figures in ``plots``)
and sampling text from it (``sampling``).

The files ``evaluate_workdir`` writes into a workdir, named here so that readers (the study)
need not import JAX to find them.
"""

RESULTS_FILE = "eval_results.json"
REPORT_FILE = "eval_report.md"
BPC_PLOT = "bpc_vs_sigma.png"
MARGIN_PLOT = "margin_hist.png"
MARGINS_FILE = "margins.npz"


def result_tag(output_tag: str = "", noise_layer: int = 0) -> str:
    """The tag of an evaluation's file names: ``output_tag``, then ``noise_layerL``."""
    return "_".join(part for part in (output_tag, f"noise_layer{noise_layer}" if noise_layer
                                      else "") if part)


def output_name(name: str, tag: str = "") -> str:
    """A result file's name: ``eval_results.json``, or with a tag ``eval_results_TAG.json``."""
    if not tag:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}_{tag}.{suffix}"
