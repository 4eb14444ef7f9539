"""
evaluation.py -- how well does a chat checkpoint do on held-out tasks?

    python evaluation.py                               # weight/sft on the default held-out set
    python evaluation.py --ckpt weight/pretrain        # the baseline: a model that never saw a chat
    python evaluation.py --ckpt weight/sft --data my_eval.jsonl --out report.json

Exact match: the prompt is every message before the last assistant answer, rendered
with the chat template; the model answers greedily until <|im_end|>; the answer counts
only if it equals the expected text exactly (spaces at the ends ignored). Results per
task family and overall, as JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import DEFAULT_CHAT_DIR, IGNORE_INDEX, collate
from tokenizer.chat import render_chat
from training import (ROOT, arg, atomic_write_text, load_checkpoint, load_checkpoint_tokenizer, main_guard,
                      parse_config, resolve_device)

DEFAULT_EVAL_DATA = DEFAULT_CHAT_DIR / "sft_eval.jsonl"


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy answer to each conversation (its last assistant message is left out).

    Prompts of equal length are generated together as one batch (no padding needed);
    each row stops at its own <|im_end|>.
    """
    device = next(model.parameters()).device
    prompts = [render_chat(c[:-1], tokenizer, add_generation_prompt=True)[0] for c in conversations]
    by_length = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    answers = [""] * len(prompts)
    model.eval()
    for length, rows in by_length.items():
        budget = min(max_new_tokens, model.config.block_size - length)
        if budget <= 0:
            continue                                                     # no room to answer: counts as wrong
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            x = torch.tensor([prompts[i] for i in chunk], device=device)          # (b, length)
            out = model.generate(x, budget, temperature=0.0, stop_tokens=(tokenizer.im_end_id,))
            for row, i in enumerate(chunk):
                new = out[row, length:].tolist()
                if tokenizer.im_end_id in new:
                    new = new[:new.index(tokenizer.im_end_id)]
                answers[i] = tokenizer.decode(new)
    return answers


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
        if len(shown) < examples * len(total) and sum(1 for s in shown if s["family"] == family) < examples:
            shown.append({"family": family, "prompt": record["conversations"][-2]["content"],
                          "expected": expected, "answer": answer, "correct": ok})
    by_family = {f: right[f] / total[f] for f in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "accuracy_by_family": by_family,
            "n": sum(total.values()), "examples": shown}


def format_report(report: dict) -> str:
    families = ", ".join(f"{f} {a:.0%}" for f, a in report["accuracy_by_family"].items())
    return f"exact match {report['accuracy']:.1%} on {report['n']} held-out items ({families})"


def answer_loss_evaluator(examples, batch_size: int, pad_id: int, device):
    """evaluate(model, max_tokens) -> {"val_loss": mean loss per answer token on held-out conversations}."""
    def evaluate(model, max_tokens):
        nats, count, seen = 0.0, 0, 0
        for start in range(0, len(examples), batch_size):
            x, y = collate(examples[start:start + batch_size], pad_id)
            x, y = x.to(device), y.to(device)
            _, loss = model(x, y, reduction="none")                    # (b, T), 0 where ignored
            nats += loss.float().sum().item()
            count += (y != IGNORE_INDEX).sum().item()
            seen += x.numel()
            if max_tokens and seen >= max_tokens:
                break
        return {"val_loss": nats / max(count, 1)}
    return evaluate


@dataclass
class EvalConfig:
    ckpt: str = arg("weight/sft", "checkpoint folder to evaluate")
    data: str = arg(str(DEFAULT_EVAL_DATA.relative_to(ROOT)), "held-out conversations (.jsonl)")
    max_new_tokens: int = arg(32, "longest answer generated")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    out: str = arg("", "write the JSON report here ('' = only print it)")


def main(argv=None):
    from data.chat_data import read_conversations
    cfg = parse_config(EvalConfig, __doc__.split("\n\n")[0].strip(), argv)
    device = resolve_device(cfg.device)
    model, _ = load_checkpoint(cfg.ckpt, device, make_hint="python full_sft.py")
    tokenizer = load_checkpoint_tokenizer(cfg.ckpt)
    if not Path(cfg.data).exists() and Path(cfg.data).resolve() == DEFAULT_EVAL_DATA:
        raise FileNotFoundError(f"{cfg.data} not found: `python full_sft.py` builds the default chat data")
    records = list(read_conversations(cfg.data))
    report = exact_match_report(model, tokenizer, records, cfg.max_new_tokens)
    print(f"{cfg.ckpt}: {format_report(report)}")
    for e in report["examples"]:
        print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r} ({'ok' if e['correct'] else 'expected ' + repr(e['expected'])})")
    if cfg.out:
        atomic_write_text(Path(cfg.out), json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main_guard(main)
