"""The import graph keeps the layout the README describes: stages on top, shared modules below,
model.py and tokenizer/ at the bottom. Every import of every project file counts, also the ones
inside functions.

    stages (top-level scripts: pretrain.py, full_sft.py, lora.py, dpo.py, inference.py, serve.py,
            evaluation.py, pipeline.py, and any new one)
      5  scoring.py, agent.py
      4  training.py, engine.py, weight/__main__.py, tools.py
      3  weight/checkpoint.py, optim.py, memory.py, report.py
      2  data/, weight/hf.py, weight/gguf.py, runtime.py, flags.py, retrieval.py
      1  tokenizer/
      0  model.py, atomic.py

An import of `a.b` counts as an import of a/b.py: the package's __init__.py runs first, but a
package that re-exports its own submodules is not a cycle.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in ROOT.rglob("*.py") if not ({"tests", "notebooks", ".venv"} & set(p.relative_to(ROOT).parts)))
STAGES = sorted(p.name for p in ROOT.glob("*.py") if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))
SHARED = ["engine.py", "scoring.py", "training.py", "optim.py", "flags.py", "runtime.py", "atomic.py", "model.py"]


def module_file(name: str) -> Path | None:
    """The project file a dotted module name means: a/b.py, or a/b/__init__.py; None if not the project's."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists() and "tests" not in candidate.relative_to(ROOT).parts[:1]:
            return candidate
    if name.split(".")[0] in ("tests", "conftest", "hf_helpers"):
        return ROOT / "tests"                       # an import of a test module
    return None


def imports_of(path: Path) -> set[Path]:
    """Every project file `path` imports, wherever the import statement stands."""
    package = path.relative_to(ROOT).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from a import b` may name a submodule a/b.py, or something defined in a/__init__.py
            names = [f"{module}.{alias.name}" if module_file(f"{module}.{alias.name}") else module
                     for alias in node.names]
        for name in names:
            target = module_file(name)
            if target is not None and target != path:
                found.add(target)
    return found


GRAPH = {path: imports_of(path) for path in SOURCES}


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_expected_files_are_read():
    assert {"pretrain.py", "full_sft.py", "lora.py", "dpo.py", "inference.py", "serve.py", "evaluation.py",
            "pipeline.py"} <= set(STAGES)
    assert all((ROOT / f).exists() for f in SHARED)
    # the graph sees imports inside functions and relative imports
    assert ROOT / "tokenizer" / "tokenizer.py" in GRAPH[ROOT / "tokenizer" / "hf.py"]
    assert ROOT / "model.py" in GRAPH[ROOT / "pretrain.py"]


def test_no_import_cycles():
    for path in SOURCES:
        cycle = path in closure(path)
        assert not cycle, f"{name(path)} imports itself through " + \
            ", ".join(sorted(name(p) for p in closure(path) if path in closure(p)))


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_never_imports_another_stage(stage):
    others = {ROOT / s for s in STAGES if s != stage}
    direct = GRAPH[ROOT / stage] & others
    assert not direct, f"{stage} imports the stage(s) {sorted(name(p) for p in direct)}: move what they share down"


def test_shared_modules_never_import_a_stage_a_test_or_a_notebook():
    stages = {ROOT / s for s in STAGES}
    for path in SOURCES:
        if (path.name in STAGES and path.parent == ROOT) or path.parent.name == "bench":
            continue                                # stages and benchmarks are the top
        bad = GRAPH[path] & (stages | {ROOT / "tests"})
        assert not bad, f"{name(path)} imports {sorted(name(p) for p in bad)}"


def test_model_and_atomic_import_nothing_from_the_project():
    for bottom in ("model.py", "atomic.py"):
        assert GRAPH[ROOT / bottom] == set(), f"{bottom} imports {sorted(map(name, GRAPH[ROOT / bottom]))}"


def test_tokenizer_and_data_stay_below_the_training_code():
    allowed = {"tokenizer": {"tokenizer", "atomic.py"}, "data": {"data", "tokenizer", "atomic.py", "model.py"}}
    for folder, ok in allowed.items():
        for path in (ROOT / folder).glob("*.py"):
            for target in GRAPH[path]:
                top = target.relative_to(ROOT).parts[0]
                assert top in ok, f"{name(path)} imports {name(target)}: {folder}/ may import only {sorted(ok)}"


# every file's layer: a file may import only files of lower layers (or of its own package)
LAYERS = {
    0: ["model.py", "atomic.py"],
    1: ["tokenizer/"],
    2: ["data/", "weight/hf.py", "weight/gguf.py", "weight/__init__.py", "runtime.py", "flags.py", "retrieval.py"],
    3: ["weight/checkpoint.py", "optim.py", "memory.py", "report.py"],
    4: ["training.py", "engine.py", "weight/__main__.py", "tools.py"],
    5: ["scoring.py", "agent.py"],
}


def layer_of(path: Path):
    rel = name(path)
    for layer, members in LAYERS.items():
        if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in members):
            return layer
    return None                                     # a stage or a benchmark: the top


def test_every_shared_file_has_a_layer_and_imports_only_go_down():
    stages = {ROOT / s for s in STAGES}
    for path in SOURCES:
        if path in stages or path.parent.name == "bench":
            continue
        assert layer_of(path) is not None, f"{name(path)} has no layer in tests/test_layout.py's LAYERS: add it"
        for target in GRAPH[path]:
            same_package = target.parent == path.parent and path.parent != ROOT
            assert same_package or layer_of(target) < layer_of(path), \
                f"{name(path)} (layer {layer_of(path)}) imports {name(target)} (layer {layer_of(target)}): imports go down"


@pytest.mark.parametrize("user", ["inference.py", "serve.py", "evaluation.py", "engine.py", "weight/__main__.py",
                                  "agent.py"])
def test_loading_a_model_to_chat_serve_evaluate_or_export_never_imports_the_training_loop(user):
    reached = {name(p) for p in closure(ROOT / user)}
    assert not reached & {"training.py", "optim.py"}, f"{user} reaches {sorted(reached & {'training.py', 'optim.py'})}"
    assert "model.py" in reached and "weight/checkpoint.py" in reached
