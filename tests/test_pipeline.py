"""pipeline.py: which stages run, and the final table of every stage's numbers."""
import json

import pytest

import pipeline

SFT = {"accuracy": 0.55, "accuracy_before": 0.0, "accuracy_by_family": {"add": 0.1, "repeat": 0.9},
       "accuracy_by_family_before": {"add": 0.0, "repeat": 0.0}}
LORA = {"new_skill_accuracy": 0.7, "new_skill_accuracy_before": 0.0, "old_skills_accuracy": 0.5,
        "old_skills_accuracy_before": 0.55, "trainable_fraction": 0.044,
        "accuracy_by_family": {"add": 0.1, "repeat": 0.8, "first": 0.7}}
DPO = {"preference_accuracy": 0.85, "reward_margin": 0.9, "accuracy": 0.54, "accuracy_before": 0.55,
       "accuracy_by_family": {"add": 0.1, "repeat": 0.88}}
PRE = {"val_bpb": 2.1, "val_bpb_en": 2.05, "val_bpb_zh": 2.25}


def test_table_shows_each_stage_with_its_target_and_every_family():
    choice = {"pretrain": {"accuracy_norm": 0.3, "chance": 0.25, "accuracy_norm_by_family": {"next_line": 0.3}}}
    table = pipeline.summary_table({"pretrain": PRE, "sft": SFT, "lora": LORA, "dpo": DPO, "choice": choice,
                                    "seconds": {"sft": 250.0}})
    lines = table.splitlines()
    row = lambda name: next(line for line in lines if line.startswith(f"| {name} "))   # noqa: E731
    assert "0.0% -> 55.0%" in row("sft") and "| yes" in row("sft") and "250 s" in row("sft")
    assert "0.0% -> 70.0%" in row("lora") and "| yes" in row("lora") and "kept" in row("lora")
    assert "**no**" in row("dpo")                  # task accuracy fell below SFT's: the target is missed
    assert "90.0%" in row("repeat") and "88.0%" in row("repeat") and "70.0%" in row("first")
    assert "30.0%" in row("choice: next_line")


def test_finished_stages_are_kept_and_the_rest_run_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    for stage, data in (("pretrain", PRE), ("sft", SFT)):
        (tmp_path / "weight" / stage).mkdir(parents=True)
        (tmp_path / "weight" / stage / "metrics.json").write_text(json.dumps(data))
    ran = []

    def fake_run(name, command, log_path):
        ran.append((name, command))
        out = {"lora": ("weight/lora", LORA), "dpo": ("weight/dpo", DPO)}[name]
        (tmp_path / out[0]).mkdir(parents=True, exist_ok=True)
        (tmp_path / out[0] / "metrics.json").write_text(json.dumps(out[1]))
        return 1.0
    monkeypatch.setattr(pipeline, "run_stage", fake_run)
    pipeline.main(["--stages", "pretrain", "sft", "lora", "dpo"])
    assert [name for name, _ in ran] == ["lora", "dpo"]
    assert ran[0][1][0] == "lora.py" and "--overwrite" not in ran[0][1]
    results = json.loads((tmp_path / "weight" / "pipeline.json").read_text())
    assert results["sft"] == SFT and "lora" in (tmp_path / "weight" / "pipeline.md").read_text()
    ran.clear()
    pipeline.main(["--stages", "dpo", "--overwrite"])       # a finished stage is retrained only when asked
    assert ran[0][0] == "dpo" and "--overwrite" in ran[0][1]


def test_a_stage_cut_off_midway_is_resumed_or_started_over(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    for stage, data in (("pretrain", PRE), ("sft", SFT)):
        (tmp_path / "weight" / stage).mkdir(parents=True)
        (tmp_path / "weight" / stage / "metrics.json").write_text(json.dumps(data))
    (tmp_path / "weight" / "lora").mkdir()
    (tmp_path / "weight" / "lora" / "adapter.pt").write_bytes(b"step 0")      # killed after an evaluation
    (tmp_path / "weight" / "lora" / "resume.pt").write_bytes(b"step 130")
    (tmp_path / "weight" / "dpo").mkdir()
    (tmp_path / "weight" / "dpo" / "model.pt").write_bytes(b"step 0")         # killed before any resume.pt
    ran = {}

    def fake_run(name, command, log_path):
        ran[name] = command
        out, data = {"lora": ("weight/lora", LORA), "dpo": ("weight/dpo", DPO)}[name]
        (tmp_path / out / "metrics.json").write_text(json.dumps(data))
        return 1.0
    monkeypatch.setattr(pipeline, "run_stage", fake_run)
    pipeline.main(["--stages", "pretrain", "sft", "lora", "dpo"])
    assert "--resume" in ran["lora"] and "--overwrite" not in ran["lora"]
    assert "--overwrite" in ran["dpo"] and "--resume" not in ran["dpo"]


def test_unknown_stages_are_refused_with_the_list():
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['sfft'\]: choose from pretrain, sft, lora, dpo, eval"):
        pipeline.main(["--stages", "sfft"])
