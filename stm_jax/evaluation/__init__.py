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
