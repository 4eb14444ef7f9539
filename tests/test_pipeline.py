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
    assert "0.0% -> 55.0%" in row("sft") and "| yes" in row("sft") and "250 s" in row("sft") and ">= 50%" in row("sft")
    assert "2.050" in row("pretrain") and "| yes" in row("pretrain")          # English 2.05 <= 2.10
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

    def fake_run(name, command, log_path, **_):
        ran.append((name, command))
        out = {"lora": ("weight/lora", LORA), "dpo": ("weight/dpo", DPO)}[name]
        (tmp_path / out[0]).mkdir(parents=True, exist_ok=True)
        (tmp_path / out[0] / "metrics.json").write_text(json.dumps(out[1]))
        return 1.0
    monkeypatch.setattr(pipeline, "run_stage", fake_run)
    monkeypatch.setattr(pipeline, "calibration_seconds", lambda device, dtype: 0.1)
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
    (tmp_path / "weight" / "dpo" / "model.pt").write_bytes(b"step 0")         # killed before any resume.pt,
    (tmp_path / "weight" / "eval").mkdir()
    (tmp_path / "weight" / "eval" / "dpo.started").write_text("dpo.py")       # in a stage the pipeline began
    ran = {}

    def fake_run(name, command, log_path, **_):
        ran[name] = command
        out, data = {"lora": ("weight/lora", LORA), "dpo": ("weight/dpo", DPO)}[name]
        (tmp_path / out / "metrics.json").write_text(json.dumps(data))
        return 1.0
    monkeypatch.setattr(pipeline, "run_stage", fake_run)
    monkeypatch.setattr(pipeline, "calibration_seconds", lambda device, dtype: 0.1)
    pipeline.main(["--stages", "pretrain", "sft", "lora", "dpo"])
    assert "--resume" in ran["lora"] and "--overwrite" not in ran["lora"]
    assert "--overwrite" in ran["dpo"] and "--resume" not in ran["dpo"]


def test_weights_the_pipeline_did_not_train_are_never_replaced_unasked(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    imported = tmp_path / "weight" / "pretrain"
    imported.mkdir(parents=True)
    (imported / "model.pt").write_bytes(b"imported with python -m weight import")   # no metrics.json, no resume.pt
    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, command, log_path, **_: ran.append(name) or 1.0)
    monkeypatch.setattr(pipeline, "calibration_seconds", lambda device, dtype: 0.1)
    with pytest.raises(ValueError, match=r"weight/pretrain/model.pt was not trained by the pipeline.*"
                                         r"--stages sft lora dpo eval.*--overwrite"):
        pipeline.main([])
    assert ran == [] and (imported / "model.pt").read_bytes() == b"imported with python -m weight import"
    pipeline.main(["--stages", "pretrain", "--overwrite"])       # asked for: retrained
    by_hand = tmp_path / "weight" / "sft_cot"
    by_hand.mkdir()
    (by_hand / "model.pt").write_bytes(b"trained by hand")               # the stage after it is grpo, not lora
    with pytest.raises(ValueError, match=r"weight/sft_cot/model.pt was not trained by the pipeline.*--stages grpo eval\)"):
        pipeline.main(["--stages", "sft_cot", "grpo"])
    assert ran == ["pretrain"]


def test_the_reasoning_stages_asked_for_get_their_rows_and_columns():
    sft_cot = {"accuracy": 0.55, "accuracy_before": 0.0, "accuracy_by_family": {"add": 0.1, "repeat": 0.9}}
    grpo = {"accuracy": 0.6, "accuracy_before": 0.55, "mean_reward_first": 0.4, "mean_reward_last": 0.52,
            "accuracy_by_family": {"add": 0.12, "repeat": 0.95}, "answers_gained": 21, "answers_lost": 1,
            "sign_test_p": 1.1e-5}
    table = pipeline.summary_table({"sft": SFT, "sft_cot": sft_cot, "grpo": grpo, "seconds": {"sft_cot": 700.0, "grpo": 90.0}})
    row = lambda name: next(line for line in table.splitlines() if line.startswith(f"| {name} "))   # noqa: E731
    assert "0.0% -> 55.0%" in row("sft_cot") and "| yes" in row("sft_cot") and "700 s" in row("sft_cot")
    assert "55.0% -> 60.0% (+21 / -1, p 1.1e-05); 0.40 -> 0.52" in row("grpo")
    assert "| yes" in row("grpo") and "90 s" in row("grpo")
    assert [c.strip() for c in row("task family").split("|")[-3:-1]] == ["sft_cot", "grpo"]   # their own columns
    assert "90.0%" in row("repeat") and "95.0%" in row("repeat")
    assert "**no**" in pipeline.summary_table({"sft_cot": {**sft_cot, "accuracy": 0.45}})
    assert "**no**" in pipeline.summary_table({"grpo": {**grpo, "accuracy": 0.55}})     # not above SFT's
    # above SFT by 6 of 400 items that a coin could have flipped: not a gain
    assert "**no**" in pipeline.summary_table({"grpo": {**grpo, "answers_gained": 9, "answers_lost": 3, "sign_test_p": 0.15}})


def test_the_table_of_an_english_only_run_shows_no_chinese_figure():
    pre = {"val_bpb": 2.05, "val_bpb_en": 2.05, "val_bpb_zh": None}      # setup without fortunes-zh
    choice = {"pretrain": {"accuracy_norm": 0.3, "chance": 0.25, "accuracy_norm_by_family": {"next_line": 0.3}}}
    table = pipeline.summary_table({"pretrain": pre, "sft": SFT, "choice": choice, "seconds": {"pretrain": 1.0}})
    row = next(line for line in table.splitlines() if line.startswith("| pretrain "))
    assert "2.050 (2.050 / -)" in row and "| yes" in row


def test_every_stage_gets_the_pipelines_seed_device_and_dtype_and_eval_scores_each_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    outputs = {"pretrain": PRE, "sft": SFT, "lora": LORA, "dpo": DPO}
    ran = []

    def fake_run(name, command, log_path, **_):
        ran.append((name, command))
        if name in outputs:                                   # a stage writes its folder and metrics
            folder = tmp_path / pipeline.STAGES[name][1]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.json").write_text(json.dumps(outputs[name]))
        else:                                                 # "eval <stage>": evaluation.py --out report.json
            out = command[command.index("--out") + 1]
            choice = {"accuracy_norm": 0.3, "chance": 0.25, "accuracy_norm_by_family": {"next_line": 0.3}}
            (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / out).write_text(json.dumps({"choice": choice}))
        return 1.0
    monkeypatch.setattr(pipeline, "run_stage", fake_run)
    monkeypatch.setattr(pipeline, "calibration_seconds", lambda device, dtype: 0.1)
    monkeypatch.chdir(tmp_path)
    pipeline.main(["--seed", "7", "--dtype", "float32", "--device", "cpu"])
    stages = [(name, cmd) for name, cmd in ran if not name.startswith("eval")]
    assert [name for name, _ in stages] == ["pretrain", "sft", "lora", "dpo"]
    for name, cmd in stages:
        flags = " ".join(cmd)
        assert cmd[0] == f"{'full_sft' if name == 'sft' else name}.py", cmd
        assert "--seed 7" in flags and "--dtype float32" in flags and "--device cpu" in flags, (name, flags)
    evaluated = [name for name, _ in ran if name.startswith("eval")]
    assert evaluated == ["eval pretrain", "eval sft", "eval lora", "eval dpo"]      # every checkpoint, in order
    table = (tmp_path / "weight" / "pipeline.md").read_text()
    assert "pretrain 30.0%" in table and "dpo 30.0%" in table
    # the report card: the same numbers on one page, with the per-family chart (tests/test_web.py renders one)
    card = (tmp_path / "weight" / "report.html").read_text()
    assert "Report card" in card and "0.0% -&gt; 55.0%" in card and "data:image/png;base64," in card


def test_unknown_stages_are_refused_with_the_list():
    with pytest.raises(ValueError,
                       match=r"unknown stage\(s\) \['sfft'\]: choose from pretrain, sft, lora, dpo, sft_cot, grpo, eval"):
        pipeline.main(["--stages", "sfft"])


def test_the_estimate_scales_the_reference_times_by_this_machines_step(monkeypatch):
    monkeypatch.setitem(pipeline.REFERENCE, "calibration_seconds", 2.0)
    monkeypatch.setitem(pipeline.REFERENCE, "seconds", {"pretrain": 600.0, "sft": 300.0, "eval": 60.0})
    assert pipeline.estimate(["pretrain", "sft"], 1.0) == {"pretrain": 300.0, "sft": 150.0}   # twice as fast here


def test_a_stages_progress_bar_feeds_the_pipeline_and_its_other_lines_are_shown(tmp_path):
    script = ("import sys\n"
              "sys.stdout.write('bpe merges: 100%|#| 7/7 [00:00]\\r')\n"             # another bar: log only
              "sys.stdout.write('sft:  25%|##  | 5/20 [00:01<00:03]\\r')\n"
              "print('sft:  50%|####| 10/20 [00:02<00:02]\\rstep 10: val_loss 1.234')\n"
              "print('done')\n")
    (tmp_path / "fake_stage.py").write_text(script)
    fractions, shown = [], []
    pipeline.run_stage("sft", [str(tmp_path / "fake_stage.py")], tmp_path / "sft.log", progress=fractions.append,
                       show=shown.append)
    assert fractions == [0.25, 0.5]
    assert shown[1:] == ["step 10: val_loss 1.234", "done"] and "bpe merges" not in " ".join(shown)
    assert "5/20" in (tmp_path / "sft.log").read_text()                         # the log keeps everything
    fractions.clear()                        # the sft_cot stage runs full_sft.py, whose bar is labelled "sft:"
    pipeline.run_stage("sft_cot", [str(tmp_path / "fake_stage.py")], tmp_path / "sft_cot.log",
                       progress=fractions.append, show=shown.append, bar=pipeline.BAR_LABELS["sft_cot"])
    assert fractions == [0.25, 0.5]


def test_progress_counts_finished_stages_and_the_running_one():
    progress = pipeline.Progress({"pretrain": 300.0, "sft": 100.0})
    progress.update("pretrain", 0.5)
    assert progress.bar.n == 150
    progress.finish("pretrain")
    progress.update("sft", 0.5)
    assert progress.bar.n == 350 and "left (sft)" in progress.bar.desc
    progress.close()
