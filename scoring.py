"""
scoring.py -- how the chat stages measure a model: exact match on held-out tasks, and the loss
on held-out answers.

    exact_match_report(model, tokenizer, records)   greedy answers, compared with the expected
                                                    ones: accuracy overall and per task family
    answer_loss_evaluator(examples, ...)            for the training loop: mean loss per answer token
    bootstrap_interval(values), centred(score, chance)   how sure a benchmark score is, and how far
                                                    above chance it lies (evaluation.py's benchmarks)

An answer counts only if it equals the expected text exactly (spaces at the ends
ignored). The answers come from the same batched engine as inference.py and serve.py.
full_sft.py, lora.py and dpo.py report before and after training with these;
evaluation.py is the command-line tool around them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from engine import Engine, SamplingParams
from model import IGNORE_INDEX
from tokenizer.chat import render_chat


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


def exact_match_report(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                       examples: int = 3) -> dict:
    """{"accuracy": overall 0-1, "accuracy_by_family": {...}, "n": ..., "examples": [...]}."""
    answers = greedy_answers(model, tokenizer, [r["conversations"] for r in records], max_new_tokens)
    right, total = defaultdict(int), defaultdict(int)
    shown = []
    for record, answer in zip(records, answers):
        expected = record["conversations"][-1]["content"]
        ok = answer.strip() == expected.strip()
        family = record.get("family", "user")
        right[family] += ok
        total[family] += 1
        if sum(1 for s in shown if s["family"] == family) < examples:       # the first few of each family
            shown.append({"family": family, "prompt": record["conversations"][-2]["content"],
                          "expected": expected, "answer": answer, "correct": ok})
    by_family = {f: right[f] / total[f] for f in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "accuracy_by_family": by_family,
            "n": sum(total.values()), "examples": shown}


def format_report(report: dict) -> str:
    families = ", ".join(f"{f} {a:.0%}" for f, a in report["accuracy_by_family"].items())
    return f"exact match {report['accuracy']:.1%} on {report['n']} held-out items ({families})"


def task_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int, label: str) -> dict:
    """exact_match_report, printed on one line: '{label}: exact match 53.2% on 400 held-out items (...)'."""
    report = exact_match_report(model, tokenizer, records, max_new_tokens)
    print(f"{label}: {format_report(report)}")
    return report


def before_and_after(before: dict, after: dict) -> dict:
    """The task-accuracy keys of a chat stage's metrics.json, after training and before it."""
    return {"accuracy": after["accuracy"], "accuracy_by_family": after["accuracy_by_family"],
            "accuracy_before": before["accuracy"], "accuracy_by_family_before": before["accuracy_by_family"]}


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
