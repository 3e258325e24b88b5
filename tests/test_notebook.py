"""The quickstart notebook executes top to bottom (demo model; a few minutes on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.integration
@pytest.mark.heavy
def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (ipykernel)")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
        if o.output_type == "stream"
    )
    assert "selected: position" in text and "guard AUROC" in text
    assert "| baseline |" in text and "| ablate |" in text
    plots = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.output_type in ("execute_result", "display_data")  # plotly displays, not returns
             and "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) == 2
