"""DPO: the loss by hand, preference data, and dpo.py end to end on a tiny model."""
import json
import math

import pytest
import torch

import dpo
import full_sft
from conftest import WORDS
from data.chat_data import (generate_chat_data, plausible_wrong_answer, preference_pair, read_preference_pairs,
                            synthetic_names, write_jsonl)


def test_dpo_loss_matches_a_worked_example():
    # margin = beta * ((pi_c - ref_c) - (pi_r - ref_r)) = 0.5 * ((-1 + 2) - (-3 + 2)) = 1
    loss, margin = dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                torch.tensor([-2.0]), beta=0.5)
    assert margin.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_dpo_loss_is_log2_when_the_policy_is_the_reference():
    logps = torch.randn(4), torch.randn(4)
    loss, margin = dpo.dpo_loss(*logps, *logps, beta=0.1)
    assert torch.allclose(loss, torch.full((4,), math.log(2)))
    assert torch.equal(margin, torch.zeros(4))


def test_rejected_answers_are_wrong_and_pairs_share_the_prompt():
    import random
    train, _ = generate_chat_data(WORDS, 200, 1, seed=0)
    rng = random.Random(0)
    for record in train:
        wrong = plausible_wrong_answer(record, rng, WORDS, synthetic_names())
        if wrong is None:
            continue
        pair = preference_pair(record, wrong)
        assert pair["chosen"][:-1] == pair["rejected"][:-1]
        assert pair["chosen"][-1]["content"] != pair["rejected"][-1]["content"]


def test_bad_preference_lines_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"chosen": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='p.jsonl:1: needs "chosen" and "rejected"'):
        list(read_preference_pairs(path))


def test_dpo_runs_end_to_end_and_reports_preferences(tiny_pretrained, tmp_path):
    sft = tmp_path / "sft"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
                   "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(sft), "--max_steps", "3",
                   "--eval_interval", "3", "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "2"])
    import random
    rng = random.Random(0)
    train, held_out = generate_chat_data(WORDS, 60, 2, seed=5)
    pairs = lambda records: [preference_pair(r, w) for r in records  # noqa: E731
                             if (w := plausible_wrong_answer(r, rng, WORDS, synthetic_names())) is not None]
    write_jsonl(tmp_path / "pairs.jsonl", pairs(train))
    write_jsonl(tmp_path / "pairs_eval.jsonl", pairs(held_out))
    out = tmp_path / "dpo"
    dpo.main(["--init_from", str(sft), "--data", str(tmp_path / "pairs.jsonl"),
              "--eval_data", str(tmp_path / "pairs_eval.jsonl"), "--task_data", str(tiny_pretrained / "eval.jsonl"),
              "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "2", "--time_budget", "0",
              "--batch_size", "4", "--max_new_tokens", "2", "--lr", "1e-3"])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("preference_accuracy", "reward_margin", "accuracy", "accuracy_by_family", "accuracy_before"):
        assert metrics[key] is not None, key
    # the saved weights are trained ones, never the step-0 copy of the SFT model (whose margins are all 0)
    assert metrics["preference_accuracy"] > 0
    start, saved = (torch.load(d / "model.pt", weights_only=True) for d in (sft, out))
    assert any(not torch.equal(start[k], saved[k]) for k in start)
    import csv
    with open(out / "log.csv", newline="") as f:
        step0 = next(row for row in csv.DictReader(f) if row["step"] == "0" and row["val_loss"])
    # at step 0 the policy is the reference: every margin is exactly 0 and the loss log 2
    assert float(step0["val_loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_data_without_eval_data_holds_out_every_20th_pair(tiny_pretrained, tmp_path, capsys):
    import random
    rng = random.Random(1)
    train, _ = generate_chat_data(WORDS, 60, 1, seed=7)
    pairs = [preference_pair(r, w) for r in train if (w := plausible_wrong_answer(r, rng, WORDS, synthetic_names()))]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    flags = ["--init_from", str(tiny_pretrained / "ckpt"), "--task_data", str(tiny_pretrained / "eval.jsonl"),
             "--max_steps", "1", "--eval_interval", "1", "--time_budget", "0", "--batch_size", "4",
             "--max_new_tokens", "1"]
    with pytest.raises(ValueError, match="--eval_data needs --data"):
        dpo.main(flags + ["--eval_data", str(tmp_path / "pairs.jsonl"), "--out_dir", str(tmp_path / "x")])
    dpo.main(flags + ["--data", str(tmp_path / "pairs.jsonl"), "--out_dir", str(tmp_path / "dpo")])
    held_out = len(pairs[::20])
    assert f"data: no --eval_data: {held_out} records of" in capsys.readouterr().out
    from weight.checkpoint import load_checkpoint_tokenizer
    trained = dpo.encode_pairs([p for i, p in enumerate(pairs) if i % 20],   # (those longer than the context skipped)
                               load_checkpoint_tokenizer(tiny_pretrained / "ckpt"), 96)
    assert json.loads((tmp_path / "dpo" / "metrics.json").read_text())["pairs"] == len(trained) > 0


def test_generated_pairs_come_from_the_chat_tasks_and_the_models_own_answers(tiny_pretrained, tmp_path, monkeypatch,
                                                                              capsys):
    """No --data: plausible wrong answers to the SFT tasks plus the model's own wrong answers, kept in out_dir."""
    chat = tmp_path / "chat"
    train, held_out = generate_chat_data(WORDS, 80, 2, seed=3)
    write_jsonl(chat / "sft_train.jsonl", train)
    write_jsonl(chat / "sft_eval.jsonl", held_out)
    monkeypatch.setattr(dpo, "DEFAULT_CHAT_DIR", chat)
    monkeypatch.setattr(dpo, "default_words", lambda: WORDS)
    out = tmp_path / "dpo"
    dpo.main(["--init_from", str(tiny_pretrained / "ckpt"), "--task_data", str(tiny_pretrained / "eval.jsonl"),
              "--out_dir", str(out), "--max_steps", "2", "--eval_interval", "2", "--time_budget", "0",
              "--batch_size", "4", "--max_new_tokens", "2", "--on_policy", "10", "--max_pairs", "40"])
    pairs = [json.loads(line) for line in (out / "pairs_train.jsonl").read_text().splitlines()]
    prompts = {json.dumps(r["conversations"][:-1]) for r in train}
    assert pairs and all(json.dumps(p["chosen"][:-1]) in prompts for p in pairs)     # the SFT training tasks
    assert all(p["chosen"][-1]["content"] != p["rejected"][-1]["content"] for p in pairs)
    import re
    plausible, own = map(int, re.search(r"dpo: (\d+) plausible-wrong pairs \+ (\d+) on-policy", capsys.readouterr().out).groups())
    assert plausible + own == len(pairs) and 0 < plausible <= 40 and own <= 10
    held = [json.loads(line) for line in (out / "pairs_eval.jsonl").read_text().splitlines()]
    assert {json.dumps(p["chosen"]) for p in held} <= {json.dumps(r["conversations"]) for r in held_out}
    assert json.loads((out / "metrics.json").read_text())["pairs"] > 0
