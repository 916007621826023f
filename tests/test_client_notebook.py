"""docs/stream.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).parent.parent / "docs" / "stream.ipynb"


def test_the_notebook_streams_and_releases(tmp_path, gateway_root):
    from prefect.settings import PREFECT_API_URL

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               SCISTREAM_NOTEBOOK_PORT_BASE="29400", TMPDIR=str(gateway_root))
    client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}))
                      for cell in notebook.cells for o in cell.get("outputs", []))
    assert "checksums match" in outputs
    assert "released; active streams left: [0, 0]" in outputs
