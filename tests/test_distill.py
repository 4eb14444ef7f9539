"""Distillation: the loss by hand, and distill.py end to end in both modes on a tiny model."""
import json

import pytest
import torch
import torch.nn.functional as F

import distill
import full_sft


def test_the_loss_is_the_data_loss_at_alpha_1_and_zero_soft_part_when_teacher_and_student_agree():
    student, targets = torch.randn(5, 7), torch.randint(7, (5,))
    assert distill.distill_loss(student, torch.randn(5, 7), targets, 1.0, 2.0) == pytest.approx(
        F.cross_entropy(student, targets).item())
    assert distill.distill_loss(student, student.clone(), targets, 0.0, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_soft_part_is_t_squared_times_the_kl_of_the_softened_distributions():
    student, teacher, targets = torch.randn(4, 6), torch.randn(4, 6), torch.randint(6, (4,))
    t = 2.0
    p, q = F.softmax(teacher / t, -1), F.softmax(student / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()              # KL(teacher || student), per position
    assert distill.distill_loss(student, teacher, targets, 0.0, t).item() == pytest.approx((t * t * kl).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_distill_trains_a_student_from_a_teacher_and_reports_it(tiny_pretrained, tmp_path, monkeypatch, mode):
    chat = tmp_path / "chat"
    chat.mkdir()
    for name in ("train", "eval"):
        (chat / f"sft_{name}.jsonl").write_text((tiny_pretrained / f"{name}.jsonl").read_text())
    monkeypatch.setattr(distill, "DEFAULT_CHAT_DIR", chat)
    teacher = tmp_path / "teacher"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(chat / "sft_train.jsonl"),
                   "--eval_data", str(chat / "sft_eval.jsonl"), "--out_dir", str(teacher), "--max_steps", "3",
                   "--eval_interval", "3", "--batch_size", "4", "--max_new_tokens", "2"])
    out = tmp_path / "student"
    distill.main(["--teacher", str(teacher), "--init_from", str(tiny_pretrained / "ckpt"), "--out_dir", str(out),
                  "--mode", mode, "--max_steps", "2", "--eval_interval", "2", "--batch_size", "4",
                  "--max_new_tokens", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["steps"] == 2
    assert set(metrics["accuracy_by_family"]) == set(json.loads((teacher / "metrics.json").read_text())["accuracy_by_family"])
    with pytest.raises(ValueError, match="alpha goes from 0 to 1"):
        distill.main(["--teacher", str(teacher), "--alpha", "2", "--out_dir", str(tmp_path / "bad")])
