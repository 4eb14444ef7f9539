"""
scoring.py -- how the chat stages measure a model: exact match on held-out tasks, and the loss
on held-out answers.

    exact_match_report(model, tokenizer, records)   greedy answers, compared with the expected
                                                    ones: accuracy overall and per task family
    scaling_report(records, sampled_answers(...))   n sampled answers each: pass@k (one of k is right)
                                                    and maj@k (self-consistency: the majority is right)
    answer_loss_evaluator(examples, ...)            for the training loop: mean loss per answer token
    answers_changed(right_before, right_after)      the held-out items a stage gained and lost, and the
                                                    sign test's p: a real change or the noise of 400 items
    bootstrap_interval(values), centred(score, chance)   how sure a benchmark score is, and how far
                                                    above chance it lies (evaluation.py's benchmarks)
    pick_best(answers, score_answers(verifier, ...))   best of N: the majority vote, each answer's vote
                                                    weighed by the verifier's score when there is one

An answer counts only if it equals the expected text exactly (spaces at the ends
ignored). The answers come from the same batched engine as inference.py and serve.py.
full_sft.py, lora.py and dpo.py report before and after training with these;
evaluation.py is the command-line tool around them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data.cot import marked_answer
from engine import Engine, SamplingParams
from model import IGNORE_INDEX
from tokenizer.chat import render_chat
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, same_tokens


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy answer to each conversation (its last assistant message is left out).

    Prompts are sorted by length and generated up to batch_size at a time as left-padded
    batches (engine.Engine.complete, as the chat tools do); each row stops at its own <|im_end|>.
    """
    prompts = [render_chat(c[:-1], tokenizer, add_generation_prompt=True)[0] for c in conversations]
    answers = [""] * len(prompts)
    engine = Engine(model, tokenizer, chat=True, stop_tokens=(tokenizer.im_end_id,))
    fits = [i for i, ids in enumerate(prompts) if engine.room(len(ids)) > 0]    # no room: counts as wrong
    if fits:
        done = engine.complete([prompts[i] for i in fits], SamplingParams.greedy(max_new_tokens), batch_size)
        for i, completion in zip(fits, done):
            answers[i] = completion.text
    return answers


def answerer(model, tokenizer):
    """greedy_answers bound to one model: answer(conversations, max_new_tokens) -> replies, the form
    data/persona.py asks for (the data layer generates nothing itself)."""
    return lambda conversations, max_new_tokens: greedy_answers(model, tokenizer, conversations, max_new_tokens)


def is_right(answer: str, record: dict) -> bool:
    """The checker (also grpo.py's reward): the answer equals the record's last message exactly, spaces at
    the ends ignored; a record with a worked answer (data/cot.py) names its final "answer", compared with
    the text after the model's last "Answer:"."""
    if "answer" in record:
        return marked_answer(answer) == record["answer"].strip()
    return answer.strip() == record["conversations"][-1]["content"].strip()


def exact_match_report(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                       examples: int = 3) -> dict:
    """{"accuracy": overall 0-1, "accuracy_by_family": {...}, "n": ..., "examples": [...],
    "right": [True or False for each record, in order]}."""
    answers = greedy_answers(model, tokenizer, [r["conversations"] for r in records], max_new_tokens)
    right, total = defaultdict(int), defaultdict(int)
    shown, rights = [], []                                                  # rights: per item, in order
    for record, answer in zip(records, answers):
        expected = record["conversations"][-1]["content"]
        ok = is_right(answer, record)
        rights.append(ok)
        family = record.get("family", "user")
        right[family] += ok
        total[family] += 1
        if sum(1 for s in shown if s["family"] == family) < examples:       # the first few of each family
            shown.append({"family": family, "prompt": record["conversations"][-2]["content"],
                          "expected": expected, "answer": answer, "correct": ok})
    by_family = {f: right[f] / total[f] for f in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "accuracy_by_family": by_family,
            "n": sum(total.values()), "examples": shown, "right": rights}


def format_report(report: dict) -> str:
    families = ", ".join(f"{f} {a:.0%}" for f, a in report["accuracy_by_family"].items())
    return f"exact match {report['accuracy']:.1%} on {report['n']} held-out items ({families})"


def task_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int, label: str) -> dict:
    """exact_match_report, printed on one line: '{label}: exact match 53.2% on 400 held-out items (...)'."""
    report = exact_match_report(model, tokenizer, records, max_new_tokens)
    print(f"{label}: {format_report(report)}")
    return report


def before_and_after(before: dict, after: dict) -> dict:
    """The task-accuracy keys of a chat stage's metrics.json, after training and before it, with the
    first answers of each family both times (the report card shows them side by side), and how many
    items changed from wrong to right and back (see answers_changed)."""
    return {"accuracy": after["accuracy"], "accuracy_by_family": after["accuracy_by_family"],
            "accuracy_before": before["accuracy"], "accuracy_by_family_before": before["accuracy_by_family"],
            "examples": after["examples"], "examples_before": before["examples"],
            **answers_changed(before["right"], after["right"])}


NOISE_P = 0.05      # a change whose sign test p is below this is called outside the noise (change_line, pipeline.py)


def sign_test_p(gained: int, lost: int) -> float:
    """Two-sided sign test: if a stage changed nothing but luck, each changed item would be a coin flip
    (as likely gained as lost); p is the chance of a split at least this uneven. Small p: unlikely to be
    luck alone."""
    n, fewer = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(fewer + 1)) / 2 ** n           # P(at most `fewer` heads of n)
    return min(1.0, 2 * tail)


def answers_changed(right_before: list[bool], right_after: list[bool]) -> dict:
    """The same held-out items before and after a stage: most keep their answer, so the accuracies' difference
    is made of a few items that flipped. {"answers_gained": wrong -> right, "answers_lost": right -> wrong,
    "sign_test_p": ...}: 9 gained and 3 lost of 400 is +1.5 points, and p = 0.15, within the noise."""
    assert len(right_before) == len(right_after), "before and after must score the same items"
    gained = sum(1 for b, a in zip(right_before, right_after) if a and not b)
    lost = sum(1 for b, a in zip(right_before, right_after) if b and not a)
    return {"answers_gained": gained, "answers_lost": lost, "sign_test_p": sign_test_p(gained, lost)}


def change_line(metrics: dict) -> str:
    """'9 answers gained and 3 lost (sign test p = 0.15: within the noise)' from before_and_after's keys."""
    p = metrics["sign_test_p"]
    verdict = "outside the noise" if p < NOISE_P else "within the noise"
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    return f"{metrics['answers_gained']} answers gained and {metrics['answers_lost']} lost (sign test {shown}: {verdict})"


def answer_loss_evaluator(examples, batch_size: int, collate_fn, device):
    """evaluate(model, max_tokens) -> {"val_loss": mean loss per answer token on held-out conversations}.

    collate_fn turns examples into (the model's inputs..., targets, answer_mask) (data.chat_data.chat_collate);
    only answer tokens count, whatever a stage trains on, so runs with different losses compare.
    """
    def evaluate(model, max_tokens):
        nats, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            *inputs, targets, answer_mask = [t.to(device) for t in collate_fn(examples[start:start + batch_size])]
            targets = targets.masked_fill(~answer_mask, IGNORE_INDEX)     # the answers only
            _, loss = model(*inputs, targets=targets, reduction="none")   # (b, T), 0 where ignored
            nats += loss.float().sum().item()
            count += answer_mask.sum().item()
            if max_tokens and count >= max_tokens:
                break
        return {"val_loss": nats / max(count, 1)}
    return evaluate


@torch.no_grad()
def sampled_answers(model, tokenizer, conversations: list[list[dict]], n: int, max_new_tokens: int = 32,
                    temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[list[str]]:
    """n sampled answers to each conversation (pure temperature sampling: no top-k, top-p or penalty, so
    that the samples are the model's own distribution): [[answer 1, ..., answer n], ...]."""
    prompts = [render_chat(c[:-1], tokenizer, add_generation_prompt=True)[0] for c in conversations]
    engine = Engine(model, tokenizer, chat=True, stop_tokens=(tokenizer.im_end_id,))
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                            max_new_tokens=max_new_tokens, seed=seed)
    done = engine.complete([p for p in prompts for _ in range(n)], params, batch_size)
    return [[c.text for c in done[i * n:(i + 1) * n]] for i in range(len(prompts))]


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The chance that at least one of k answers drawn from n samples (correct of them right) is right:
    1 - C(n - correct, k) / C(n, k), the unbiased estimator of Chen et al. (2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def vote_totals(answers: list[str], weights: list[float] | None = None) -> dict[str, float]:
    """{final answer (after "Answer:" when there is one): its votes}, in the order first reached; each answer
    is one vote, or with weights its weight."""
    totals = {}
    for answer, weight in zip(answers, weights or [1.0] * len(answers)):
        final = marked_answer(answer)
        totals[final] = totals.get(final, 0.0) + weight
    return totals


def majority_answer(answers: list[str], weights: list[float] | None = None) -> str:
    """Self-consistency (Wang et al., 2022): the final answer given most often; with weights, the one whose
    answers weigh most. A tie goes to the answer reached first (max keeps the first of equals)."""
    totals = vote_totals(answers, weights)
    return max(totals, key=totals.get)


def scaling_report(records: list[dict], samples: list[list[str]], ks: list[int], orders: int = 16,
                   seed: int = 0) -> dict:
    """pass@k and maj@k for each k, overall and per family, from n samples per record.

    pass@k: some of k answers is right (the estimator above, over all n). maj@k: the majority
    answer of k samples is right, averaged over `orders` random draws of k of the n samples."""
    rng = np.random.default_rng(seed)
    per_k = {k: {"pass": [], "maj": []} for k in ks}
    families = []
    for record, answers in zip(records, samples):
        right = [is_right(a, record) for a in answers]
        families.append(record.get("family", "user"))
        for k in ks:
            per_k[k]["pass"].append(pass_at_k(len(answers), sum(right), k))
            draws = [rng.choice(len(answers), k, replace=False) for _ in range(orders)]
            per_k[k]["maj"].append(np.mean([is_right(majority_answer([answers[i] for i in d]), record)
                                            for d in draws]))
    return {"n": len(records), "samples": len(samples[0]) if samples else 0, "ks": ks,
            "pass_at_k": {k: float(np.mean(per_k[k]["pass"])) for k in ks},
            "maj_at_k": {k: float(np.mean(per_k[k]["maj"])) for k in ks},
            "pass_at_k_by_family": {k: mean_by_family(per_k[k]["pass"], families) for k in ks},
            "maj_at_k_by_family": {k: mean_by_family(per_k[k]["maj"], families) for k in ks}}


def mean_by_family(values: list[float], families: list[str]) -> dict[str, float]:
    """The mean of the values of each family (one value and one family per record, in order)."""
    return {f: float(np.mean([v for v, g in zip(values, families) if g == f])) for f in sorted(set(families))}


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_interval(values, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """A confidence interval for the mean of per-item scores (1 right, 0 wrong), by the percentile bootstrap.

    Draw n items with replacement from the n scored ones, `resamples` times, and take each draw's mean:
    the middle `level` of those means (2.5% to 97.5% for 95%) is the interval. It narrows like 1/sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def centred(score: float, chance: float) -> float:
    """(score - chance) / (1 - chance): 0 for guessing, 1 for every answer right, below 0 worse than guessing."""
    return (score - chance) / (1 - chance)

# ----------------------------------------------------------------------------------
# Best of N: a verifier's scores pick the answer, or the answers vote (verifier.py trains the verifier;
# inference.py --best_of and serve.py's best_of use it)

HEAD_FILE = "value_head.pt"


class RewardModel(nn.Module):
    """A transformer (model.GPT) and a value head: (ids (B, T), last (B,) index of each answer's
    last token) -> scores (B,)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config                  # what the training loop reads (MoE, sizes)
        self.value_head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)         # every answer starts at score 0: no preference yet
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        hidden = {}
        # the hidden states after the final norm, (B, T, C), taken on their way to the output head
        hook = self.backbone.final_norm.register_forward_hook(lambda module, inputs, out: hidden.update(h=out))
        try:
            self.backbone(ids)
        finally:
            hook.remove()
        h_last = hidden["h"][torch.arange(ids.shape[0], device=ids.device), last]     # (B, C)
        return self.value_head(h_last).squeeze(-1)                                    # (B,)


def answer_ids(conversation: list[dict], tokenizer) -> list[int]:
    """A whole conversation (prompt and answer) as ids, ending with the answer's <|im_end|>."""
    ids, _ = render_chat(conversation, tokenizer)
    while ids and ids[-1] != tokenizer.im_end_id:     # the template may add a newline after <|im_end|>
        ids = ids[:-1]
    return ids


def batch_of(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the index of each row's last real token (B,)."""
    longest = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], device=device)
    return ids, torch.tensor([len(s) - 1 for s in sequences], device=device)


def load_verifier(folder: str | Path, device="cpu") -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) from a folder verifier.py wrote."""
    if not (Path(folder) / HEAD_FILE).exists():
        raise FileNotFoundError(f"{folder}/{HEAD_FILE} not found: {folder} is not a verifier; make one with "
                                f"python verifier.py --out_dir {folder}")
    backbone, _ = load_checkpoint(folder, device)
    reward_model = RewardModel(backbone).to(device)
    reward_model.value_head.load_state_dict(torch.load(Path(folder) / HEAD_FILE, map_location=device,
                                                       weights_only=True))
    return reward_model.eval(), load_checkpoint_tokenizer(folder)


def verifier_for(folder: str | Path, engine: Engine) -> RewardModel:
    """load_verifier, checked against the model that will answer: the verifier must read its tokens."""
    verifier, tokenizer = load_verifier(folder, engine.device)
    if not same_tokens(tokenizer, engine.tokenizer) or verifier.config.vocab_size != engine.model.config.vocab_size:
        raise ValueError(f"--verifier {folder} reads another tokenizer than the model {engine.name}: train it from "
                         f"this model (python verifier.py --init_from <the model's folder>)")
    return verifier


@torch.no_grad()
def score_answers(reward_model: RewardModel, tokenizer, prompt: list[dict], answers: list[str]) -> list[float]:
    """The verifier's score of each answer to the prompt (the messages before the answer)."""
    device = next(reward_model.parameters()).device
    sequences = [answer_ids(prompt + [{"role": "assistant", "content": a}], tokenizer) for a in answers]
    return reward_model(*batch_of(sequences, tokenizer.eot_id, device)).tolist()


def pick_best(answers: list[str], scores: list[float] | None = None) -> tuple[int, str]:
    """Best of N: (index of the answer to keep, a line saying why), by self-consistency: the final answer
    (after "Answer:", data/cot.py) that most of the answers reach, and the first answer reaching it.

    With a verifier's scores each answer's vote weighs sigmoid(score), between 0 and 1 (how sure the
    verifier is that it is right), and the highest-scored answer reaching the winner is kept: the verifier
    breaks the vote's ties and can outvote a majority it is sure is wrong. Not its favourite alone: a
    verifier right on two pairs of three picked worse than the plain vote on the held-out tasks (best of
    8: 35.8% against 48.6%); weighting the vote by it broke ties (best of 2: 43.3% against 41.7%) and was
    level with the vote at 8 (48.5%; docs/reasoning.md)."""
    weights = None if scores is None else torch.sigmoid(torch.tensor(scores, dtype=torch.float64)).tolist()
    totals = vote_totals(answers, weights)
    winner = max(totals, key=totals.get)
    reaching = [i for i, a in enumerate(answers) if marked_answer(a) == winner]
    kept = reaching[0] if scores is None else max(reaching, key=lambda i: scores[i])
    tally = sorted(totals.items(), key=lambda item: -item[1])          # stable: equals stay in order reached
    label, votes = ("vote", "{:g}") if scores is None else ("verifier-weighted vote", "{:.2f}")
    return kept, label + " " + ", ".join(f"{votes.format(total)} x {final!r}" for final, total in tally[:4]) \
        + (", ..." if len(tally) > 4 else "")
