"""The learning path: every notebook runs top to bottom in a real Jupyter kernel, as a learner runs it.

nbclient starts an ipykernel in notebooks/ and executes the code cells in order; any error (an
exception or a failed `assert` the notebook makes in front of the learner) fails the test.
WORKSHOP_QUICK=1 asks each notebook for its small settings (fewer steps, smaller data): the
same code, run faster. Every English notebook has a Chinese twin, NN_name_zh.ipynb, whose
code is the same token for token (comments may be translated; a test compares them), so the
English notebooks are the ones executed: running a twin would run the same code a second time.
The twins are checked as notebooks (they open in Jupyter). Notebooks are stored without outputs.
"""
import io
import json
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ENGLISH = [p for p in NOTEBOOKS if not p.stem.endswith("_zh")]


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def without_comments(source: str) -> list[tuple[int, str]]:
    """The cell's Python tokens, comments and blank lines left out: what runs, not what it says."""
    skip = {tokenize.COMMENT, tokenize.NL}
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


def test_there_is_a_path():
    assert len(ENGLISH) >= 8, f"notebooks/ holds {len(ENGLISH)} English notebooks; the path has at least 8"
    numbers = [p.stem.split("_")[0] for p in ENGLISH]
    assert numbers == [f"{i:02d}" for i in range(1, len(ENGLISH) + 1)], f"numbered 01, 02, ... without gaps: {numbers}"


@pytest.mark.parametrize("path", ENGLISH, ids=[p.stem for p in ENGLISH])
def test_chinese_twin_has_the_same_code(path):
    twin = path.with_name(path.stem + "_zh.ipynb")
    assert twin.exists(), f"{path.name} has no Chinese twin {twin.name}"
    ours, theirs = code_cells(path), code_cells(twin)
    assert len(ours) == len(theirs), f"{path.name}: {len(ours)} code cells, {twin.name}: {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert without_comments(a) == without_comments(b), f"code cell {i} differs between {path.name} and {twin.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_is_a_valid_notebook(path):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))     # raises ValidationError naming the bad field


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                f"{path.name} is stored with outputs: clear them (Jupyter: Edit > Clear outputs of all cells)"


def execute(path: Path) -> dict:
    """Run one notebook in its own kernel; what happened: an error (or None), the seconds, the pictures."""
    import nbclient
    import nbformat
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    started = time.time()
    try:
        client.execute()                           # raises CellExecutionError at the first failing cell
        error = None
    except Exception as e:                         # the cell's traceback, as Jupyter shows it
        error = f"{type(e).__name__}: {e}"
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    return {"error": error, "seconds": time.time() - started,
            "pictures": sum("image/png" in o.get("data", {}) for o in outputs)}


@pytest.fixture(scope="module")
def executed(request):
    """Every notebook whose test was selected (`-k 03_` runs one) run once, two at a time: a kernel each,
    one thread each (tiny models run as fast on one thread, and two kernels fill two cores).
    WORKSHOP_QUICK=1: the notebooks' small settings."""
    selected = {item.name for item in request.session.items}
    wanted = [p for p in ENGLISH if f"test_notebook_runs_top_to_bottom[{p.stem}]" in selected]
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORKSHOP_QUICK", "1")                    # kernels inherit this process's environment
        env.setenv("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(wanted, pool.map(execute, wanted)))
    for path, r in results.items():
        print(f"{path.name}: {r['seconds']:.1f} s, {r['pictures']} pictures" + (" FAILED" if r["error"] else ""))
    return results


@pytest.mark.parametrize("path", ENGLISH, ids=[p.stem for p in ENGLISH])
def test_notebook_runs_top_to_bottom(path, executed):
    result = executed[path]
    assert result["error"] is None, f"{path.name}: {result['error']}"
    # every notebook of the path shows something: at least one picture, where a person would rather look
    assert result["pictures"] >= 1, f"{path.name} drew no picture"
