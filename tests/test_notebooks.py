"""The notebooks run top to bottom without error, and each .ipynb is in sync with its .py.

The jupytext percent-format ``.py`` is the source of truth; the paired ``.ipynb`` is generated
with ``jupytext --to ipynb notebooks/NAME.py`` and committed without outputs. To add a notebook
to the suite, add its name to ``NOTEBOOKS``.
"""

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = [
    "derivation",
    "colab_tpu",  # its CPU smoke-test form (STM_JAX_NOTEBOOK_SMOKE=1)
    "support_tokens",  # trains configs/tiny.py:margin itself (no STM_JAX_WORKDIR)
]
CELL_TIMEOUT_S = 300


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


# Executing a notebook takes 40-75 s on 2 cores, so all three run on request (`pytest -m
# slow`), which keeps the default suite within its 10 minutes. The default suite checks every
# .ipynb against its .py; test_attention.py checks what the derivation notebook checks (the
# closed-form blocks against autodiff), and tests/ covers the APIs the others use.
SLOW_TO_EXECUTE = ("derivation", "colab_tpu", "support_tokens")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_EXECUTE else name
    for name in NOTEBOOKS])
def test_notebook_executes(name, tmp_path, monkeypatch):
    """Convert the .py with jupytext and run every cell in a fresh python3 kernel."""
    monkeypatch.setenv("STM_JAX_NOTEBOOK_SMOKE", "1")  # notebooks with a smoke form use it
    notebook = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (with the traceback) on the first failure
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_in_sync_with_py(name):
    """Same cells, in the same order, in the .ipynb as in its .py (regenerate with jupytext)."""
    from_py = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    from_ipynb = jupytext.read(NOTEBOOK_DIR / f"{name}.ipynb")
    assert cell_sources(from_ipynb) == cell_sources(from_py), (
        f"notebooks/{name}.ipynb is out of sync: run `jupytext --to ipynb notebooks/{name}.py`"
    )
    outputs = [cell.get("outputs") for cell in from_ipynb.cells if cell.cell_type == "code"]
    assert not any(outputs), f"notebooks/{name}.ipynb has embedded outputs; clear them"
