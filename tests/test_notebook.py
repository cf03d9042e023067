"""notebooks/compare.ipynb runs top to bottom against sweeps the tests produce (nbclient, any cell error fails)."""

import shutil

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_compare_notebook_executes_on_two_sweeps(sweep, tmp_path, monkeypatch):
    out, _ = sweep
    second = tmp_path / "second"
    shutil.copytree(out / "runs", second / "runs")
    monkeypatch.setenv("HARNESS_SWEEPS", f"{out},{second}")
    notebook = nbformat.read(ROOT / "notebooks" / "compare.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     + str(o.get("data", {}).get("text/plain", ""))
                     for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("the most aggressive point") + text.count("No quantized point") >= 2  # a verdict per sweep
    assert "verdict:" in text and "70B" in text  # the custom policy's selection and the capacity table
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the trade-off plots of both sweeps
