"""Every notebook runs top to bottom: its code cells are executed in order, as Jupyter would."""
import json
import math
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
    if path.stem.startswith("02_"):
        losses = ns["sft_losses"]
        assert sum(losses[-10:]) / 10 < losses[0] - 2.0        # SFT: the answer loss falls
        assert ns["lora_equal"] is True                        # LoRA with B = 0 is exactly the base layer
        assert ns["merged_equal"] is True                      # merged adapter == base + adapter
        assert ns["base_unchanged"] is True                    # LoRA training leaves the base weights alone
        assert ns["lora_losses"][-1] < ns["lora_losses"][0]
        assert abs(ns["dpo_at_reference"] - math.log(2)) < 1e-6   # policy == reference: loss log 2
        assert abs(ns["dpo_losses"][0] - math.log(2)) < 1e-4   # the first DPO step starts from the reference
        assert abs(sum(ns["expert_share"]) - 1.0) < 1e-6       # every routed slot goes to some expert
        assert abs(ns["uniform"] - 1.0) < 1e-9                 # load-balancing loss at uniform routing
        assert abs(ns["moe"].aux_loss.item() - ns["by_hand"].item()) < 1e-5
        assert ns["encoder_sees_future"] is True and ns["decoder_causal"] is True
        assert ns["copy_loss"] < 0.5                           # the encoder-decoder learned to copy
