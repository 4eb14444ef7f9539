"""GRPO: group advantages, the clipped objective and its KL term by hand, sampled answers' targets,
a gradient step that makes the rewarded answer likelier, the step reward of worked answers, and grpo.py
end to end on a tiny model; the paired count of answers a stage gained and lost, with its sign test."""
import itertools
import json

import pytest
import torch

import full_sft
import grpo
from data.cot import with_trace
from model import IGNORE_INDEX
from scoring import answers_changed, change_line, sign_test_p
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer


def test_advantages_are_relative_to_the_group_and_zero_when_it_agrees():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    a = grpo.group_advantages(rewards)
    # group 0: mean 0.25, std (unbiased) 0.5 -> the right answer +1.5, the others -0.5
    assert a[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-3)
    assert torch.equal(a[1:], torch.zeros(2, 4))          # all right or all wrong: nothing to learn


def test_the_ratio_is_clipped_for_a_positive_advantage_and_kl_is_zero_at_the_reference():
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]])).requires_grad_()     # ratios 1.5, 1.1, 0.5
    loss, kl = grpo.grpo_loss(logp, old, logp.detach(), torch.tensor([1.0]), mask, clip_eps=0.2, kl_coef=0.1)
    assert kl.item() == pytest.approx(0.0)                                   # the policy is the reference
    loss.backward()
    # token 0 is past 1 + eps with A > 0: clipped, no gradient; tokens 1 and 2 are pushed up by their ratio / 3
    assert logp.grad[0].tolist() == pytest.approx([0.0, -1.1 / 3, -0.5 / 3], abs=1e-6)
    expected = -(1.2 + 1.1 + 0.5) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_the_kl_penalty_is_positive_away_from_the_reference_and_pulls_back():
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5]])
    loss, kl = grpo.grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]), mask, clip_eps=0.2, kl_coef=1.0)
    d = ref - logp.detach()
    assert kl.item() == pytest.approx((torch.exp(d) - d - 1).mean().item()) and kl.item() > 0
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0       # gradient descent moves each towards ref


@pytest.fixture(scope="module")
def tiny_sft(tiny_pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "sft"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
                   "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(out), "--max_steps", "3",
                   "--eval_interval", "3", "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "2"])
    return out


def test_sampled_answers_are_learned_only_on_their_own_tokens_up_to_the_stop(tiny_sft):
    model, _ = load_checkpoint(tiny_sft)
    tokenizer = load_checkpoint_tokenizer(tiny_sft)
    record = {"conversations": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "x"}]}
    examples, answers = grpo.sample_groups(model, tokenizer, [record, record], 3, 6, 1.0,
                                           torch.Generator().manual_seed(0))
    assert len(examples) == len(answers) == 6
    for (x, y), answer in zip(examples, answers):
        learned = y[y != IGNORE_INDEX].tolist()
        assert 1 <= len(learned) <= 6 and y[-1] != IGNORE_INDEX               # the answer, at the end
        assert torch.equal(x[1:], y[:-1].where(y[:-1] != IGNORE_INDEX, x[1:]))  # y is x shifted by one
        assert tokenizer.decode([t for t in learned if t != tokenizer.im_end_id]) == answer
        assert tokenizer.im_end_id not in learned[:-1]                        # nothing after the stop token


def test_one_step_makes_the_rewarded_answer_likelier_and_the_other_less_likely(tiny_sft):
    model, _ = load_checkpoint(tiny_sft)
    tokenizer = load_checkpoint_tokenizer(tiny_sft)
    record = {"conversations": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "x"}]}
    examples, _ = grpo.sample_groups(model, tokenizer, [record], 8, 6, 1.0, torch.Generator().manual_seed(1))
    first = examples[0][1][examples[0][1] != IGNORE_INDEX].tolist()
    other = next(i for i, (_, y) in enumerate(examples) if y[y != IGNORE_INDEX].tolist() != first)
    good, bad = examples[0], examples[other]
    from data.chat_data import collate
    x, y = collate([good, bad], tokenizer.eot_id)
    mask = y != IGNORE_INDEX

    def answer_logprobs():
        with torch.no_grad():
            return (grpo.token_logprobs(model, x, y) * mask).sum(dim=1)

    before = answer_logprobs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logp = grpo.token_logprobs(model, x, y)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.0)
    loss.backward()
    optimizer.step()
    after = answer_logprobs()
    assert after[0] > before[0] and after[1] < before[1]


def test_the_step_reward_credits_each_worked_step_written_right_and_is_plain_for_direct_answers():
    worked = with_trace({"family": "add", "conversations": [{"role": "user", "content": "Add 67 and 89."},
                                                             {"role": "assistant", "content": "156"}]})
    right = "ones: 7+9=16, 6 carry 1\ntens: 6+8+1=15, 5 carry 1\nAnswer: 156"
    assert worked["conversations"][-1]["content"] == right                   # the reference the steps are read from
    assert grpo.step_reward(right, worked) == 1.0
    assert grpo.step_reward(right.replace("15, 5", "14, 4").replace("156", "146"), worked) == 0.25   # 1 of 2 steps
    assert grpo.step_reward("tens: 6+8+1=15, 5 carry 1\nAnswer: 146", worked) == 0.0   # a step out of its place
    assert grpo.step_reward("146", worked) == 0.0
    direct = {"family": "add", "conversations": [{"role": "user", "content": "Add 67 and 89."},
                                                 {"role": "assistant", "content": "156"}]}
    assert (grpo.step_reward("156", direct), grpo.step_reward("155", direct)) == (1.0, 0.0)   # no steps: 0 or 1
    repeat = {"family": "repeat", "conversations": [{"role": "user", "content": "Repeat 'growth' three times."},
                                                    {"role": "assistant", "content": "growth\ngrowth\ngrowth"}]}
    assert grpo.step_reward("growth\ngrowth", repeat) == 0.0          # lines of a direct answer are not steps
    assert grpo.step_reward("growth\ngrowth", with_trace(repeat)) == 0.0   # ... in the worked-answer data too


@pytest.mark.parametrize("gained,lost", [(0, 0), (1, 0), (9, 3), (3, 9), (6, 6), (10, 1)])
def test_the_sign_test_is_the_share_of_coin_flip_outcomes_at_least_as_uneven(gained, lost):
    n = gained + lost                    # every way n changed items could have gone, each as likely
    uneven = abs(gained - lost)
    outcomes = list(itertools.product((1, -1), repeat=n))
    as_uneven = sum(1 for o in outcomes if abs(sum(o)) >= uneven) / len(outcomes)
    assert sign_test_p(gained, lost) == pytest.approx(as_uneven)


def test_answers_changed_counts_the_items_that_flipped_between_two_runs():
    before = [True, True, False, False, True, False]
    after = [True, False, True, True, True, False]
    changed = answers_changed(before, after)
    assert (changed["answers_gained"], changed["answers_lost"]) == (2, 1)
    assert changed["sign_test_p"] == pytest.approx(1.0)          # 2 against 1: anything but a real change
    assert change_line({**changed, "sign_test_p": 0.01}).endswith("(sign test p = 0.01: outside the noise)")
    assert "(sign test p < 0.001: outside" in change_line({**changed, "sign_test_p": 2e-7})


def test_grpo_runs_end_to_end_and_reports_the_held_out_accuracy_per_family(tiny_sft, tiny_pretrained, tmp_path,
                                                                          monkeypatch):
    # the tiny model is never right; a checker that likes answers of even length rewards some samples of a group
    monkeypatch.setattr(grpo, "is_right", lambda answer, record: len(answer) % 2 == 0)
    out = tmp_path / "grpo"
    # no --data: the prompts and held-out set the SFT model was fine-tuned and scored on (its config.json names them)
    args = ["--init_from", str(tiny_sft), "--out_dir", str(out), "--max_steps", "3",
            "--eval_interval", "3", "--batch_size", "2", "--group_size", "3", "--max_new_tokens", "3",
            "--check_items", "4", "--updates", "2"]
    grpo.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    sft = json.loads((tiny_sft / "metrics.json").read_text())
    assert set(metrics["accuracy_by_family"]) == set(sft["accuracy_by_family"])    # the same held-out set
    assert metrics["accuracy_before"] == pytest.approx(sft["accuracy"])            # ... and the same scorer
    assert metrics["steps"] == 3 and 0 < metrics["mean_reward_first"] < 1
    n = len((tiny_pretrained / "eval.jsonl").read_text().splitlines())   # the accuracies' difference: flipped items
    assert metrics["answers_gained"] - metrics["answers_lost"] == round((metrics["accuracy"] - metrics["accuracy_before"]) * n)
    rows = (out / "grpo.csv").read_text().splitlines()
    # one row per batch of samples: steps 1 and 3 sampled, step 2 (--updates 2) reused step 1's samples
    assert rows[0].split(",") == ["step", "reward", "answer_tokens", "kl", "groups_learning"] and len(rows) == 3
    assert (out / "grpo.png").stat().st_size > 0
    trained, _ = load_checkpoint(out)
    start, _ = load_checkpoint(tiny_sft)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    with pytest.raises(ValueError, match="group needs at least 2"):
        grpo.main(args + ["--group_size", "1", "--overwrite"])
    with pytest.raises(ValueError, match="--families speaker: no training record of these families"):
        grpo.main(args + ["--families", "speaker", "--overwrite"])
