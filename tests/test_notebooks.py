"""Every notebook runs top to bottom: its code cells are executed in order, as Jupyter would."""
import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")   # no screen: plt.show() does nothing

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def run_notebook(path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(path.parent)                     # Jupyter starts in the notebook's folder
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
    return namespace


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    ns = run_notebook(path, monkeypatch)
    if path.stem.startswith("01_"):
        assert ns["losses"][-1] < ns["losses"][0] - 1.0        # the model learned something
        assert ns["same"] is True                              # KV cache == recompute, greedy
        assert 0 < ns["nats"] / ns["n_bytes"] < 8              # a sane bits-per-byte
