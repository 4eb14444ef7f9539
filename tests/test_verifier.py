"""The verifier (reward model): scores read at the answer's last token, a Bradley-Terry step that ranks
the chosen answer higher, and verifier.py end to end with best-of-k."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import scoring
import verifier
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer


def test_a_score_reads_the_answers_last_token_and_padding_after_it_changes_nothing(tiny_pretrained):
    backbone, _ = load_checkpoint(tiny_pretrained / "ckpt")
    model = verifier.RewardModel(backbone)
    torch.nn.init.normal_(model.value_head.weight)
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10]
    ids, last = verifier.batch_of([short, long], pad_id=0, device="cpu")
    assert ids.shape == (2, 6) and last.tolist() == [2, 5]
    together = model(ids, last)
    alone = model(torch.tensor([short]), torch.tensor([2]))
    assert torch.allclose(together[0], alone[0], atol=1e-5)      # causal: the padding comes after, unseen


def test_a_bradley_terry_step_scores_the_chosen_answer_above_the_rejected(tiny_pretrained):
    backbone, _ = load_checkpoint(tiny_pretrained / "ckpt")
    model = verifier.RewardModel(backbone)
    chosen, rejected = verifier.batch_of([[5, 6, 7]], 0, "cpu"), verifier.batch_of([[5, 6, 9, 9]], 0, "cpu")
    assert model(*chosen).item() == model(*rejected).item() == 0.0        # a zero head: no preference yet
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = -F.logsigmoid(model(*chosen) - model(*rejected)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(*chosen).item() > model(*rejected).item()


def test_verifier_trains_on_right_and_wrong_answers_and_picks_best_of_k(tiny_pretrained, tmp_path, monkeypatch):
    # the tiny model is never right: a checker that likes answers of even length splits its samples
    even = lambda answer, record: len(answer) % 2 == 0       # noqa: E731
    monkeypatch.setattr(verifier, "is_right", even)
    monkeypatch.setattr(scoring, "is_right", even)           # maj@k and pass@k on the same checker
    monkeypatch.setattr(verifier, "DEFAULT_CHAT_DIR", tmp_path / "chat")
    (tmp_path / "chat").mkdir()
    for name in ("train", "eval"):
        (tmp_path / "chat" / f"sft_{name}.jsonl").write_text((tiny_pretrained / f"{name}.jsonl").read_text())
    sampled_from = []                                        # the weights each call of sampled_answers samples
    real = verifier.sampled_answers

    def recording(model, *args, **kwargs):
        sampled_from.append(copy.deepcopy(model.state_dict()))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(verifier, "sampled_answers", recording)
    out = tmp_path / "verifier"
    verifier.main(["--init_from", str(tiny_pretrained / "ckpt"), "--out_dir", str(out), "--prompts", "30",
                   "--eval_prompts", "8", "--samples", "4", "--max_new_tokens", "3", "--max_steps", "4",
                   "--eval_interval", "2", "--batch_size", "4", "--best_of", "4"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] > 0 and 0 <= metrics["pair_accuracy"] <= 1
    best = metrics["best_of"]
    assert best["ks"] == [1, 2, 4] and all(0 <= best["best_of_k"][str(k)] <= 1 for k in best["ks"])
    for picker in ("best_of_k", "weighted_vote_at_k", "maj_at_k"):   # of all 4 samples, no pick beats "one is right"
        assert 0 <= best[picker]["4"] <= best["pass_at_k"]["4"]
    for picker in ("best_of_k", "maj_at_k"):                         # per family too: the whole is among its parts
        families = best[f"{picker}_by_family"]["4"]
        assert len(families) > 1 and min(families.values()) <= best[picker]["4"] <= max(families.values())
    reward_model, tokenizer = verifier.load_verifier(out)
    # best-of-k ranks the policy's answers (the starting model), not answers of the verifier's trained backbone
    policy, _ = load_checkpoint(tiny_pretrained / "ckpt")
    assert all(torch.equal(sampled_from[-1][name], w) for name, w in policy.state_dict().items())
    assert not all(torch.equal(w, reward_model.backbone.state_dict()[name]) for name, w in policy.state_dict().items())
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert len(verifier.score_answers(reward_model, tokenizer, conversation, ["a", "bb", "ccc"])) == 3
    assert load_checkpoint_tokenizer(out).encode("hello") == tokenizer.encode("hello")

    # the verifier as GRPO's reward, for tasks no checker can score: its scores are the rewards, the checker unused
    import grpo

    def no_checker(answer, record):
        raise AssertionError("--reward verifier must not call the checker")
    monkeypatch.setattr(grpo, "is_right", no_checker)
    scores = []

    def scored(*args):
        scores.extend(verifier.score_answers(*args))
        return scores[-len(args[-1]):]
    monkeypatch.setattr(grpo, "score_answers", scored)
    rl = tmp_path / "grpo"
    grpo.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
               "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(rl), "--reward", "verifier",
               "--verifier", str(out), "--max_steps", "1", "--eval_interval", "1", "--batch_size", "2",
               "--group_size", "3", "--max_new_tokens", "3", "--check_items", "2", "--families"])
    assert len(scores) == 6                                  # 2 prompts x 3 answers, each scored by the verifier
    rows = (rl / "grpo.csv").read_text().splitlines()
    assert float(rows[1].split(",")[1]) == pytest.approx(sum(scores) / 6)   # the step's mean reward is theirs


def test_an_untrained_verifier_is_at_chance_on_pairs():
    """Its value head starts at zero: every answer scores 0, each pair is a tie (half right), the loss log 2."""
    import math

    import torch

    from model import GPT, ModelConfig
    from scoring import RewardModel
    from verifier import pair_accuracy
    torch.manual_seed(0)
    reward_model = RewardModel(GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)))
    pairs = [([1, 2, 3], [1, 2, 4, 5]), ([7, 8], [9])]
    loss, accuracy = pair_accuracy(reward_model, pairs, pad_id=0, device="cpu")
    assert accuracy == 0.5 and abs(loss - math.log(2)) < 1e-6


@pytest.mark.parametrize("own,flags,expected", [(5, [], 5), (None, [], 32), (5, ["--max_new_tokens", "7"], 7)])
def test_answers_are_sampled_as_long_as_the_sft_model_was_measured_with(tiny_pretrained, tmp_path, monkeypatch,
                                                                        own, flags, expected):
    import shutil
    ckpt = tmp_path / "sft"
    shutil.copytree(tiny_pretrained / "ckpt", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.setdefault("train", {})["max_new_tokens"] = own        # worked answers were measured with 64, say
    (ckpt / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(verifier, "DEFAULT_CHAT_DIR", tmp_path / "chat")
    (tmp_path / "chat").mkdir()
    for name in ("train", "eval"):
        (tmp_path / "chat" / f"sft_{name}.jsonl").write_text((tiny_pretrained / f"{name}.jsonl").read_text())

    class Stop(Exception):
        pass

    def asked(model, tokenizer, records, samples, max_new_tokens, seed):
        raise Stop(max_new_tokens)
    monkeypatch.setattr(verifier, "own_answer_pairs", asked)
    with pytest.raises(Stop) as stopped:
        verifier.main(["--init_from", str(ckpt), "--out_dir", str(tmp_path / "v"), "--prompts", "4"] + flags)
    assert stopped.value.args == (expected,)
