"""
evaluation.py -- how well does a chat checkpoint do on held-out tasks?

    python evaluation.py                               # weight/sft on the default held-out set
    python evaluation.py --ckpt weight/pretrain        # the baseline: a model that never saw a chat
    python evaluation.py --ckpt weight/sft --data my_eval.jsonl --out report.json
    python evaluation.py --ckpt weight/pretrain --tasks choice   # multiple choice only (a base model)

Two ways to score, both per task family and overall, as JSON:

Exact match (chat tasks): the prompt is every message before the last assistant answer,
rendered with the chat template; the model answers greedily until <|im_end|>; the answer
counts only if it equals the expected text exactly (spaces at the ends ignored).

Multiple choice (data/corpus_tasks.py: which line, speaker or verse comes next): each
option is scored by its log-likelihood as a continuation of the context, and the most
likely option is the model's choice; nothing is generated. This is how PPL-based
benchmarks (HellaSwag, ARC) score base models. `accuracy` compares the summed
log-probabilities, `accuracy_norm` the log-probability per byte of the option (so long
options are not penalised for their length).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from atomic import atomic_write_text
from data.chat_data import (DEFAULT_CHAT_DIR, build_default_chat_data, chat_collate, jsonl_records,
                            read_conversations, write_jsonl)
from data.corpus_tasks import DEFAULT_CHOICE_PATH, build_choice_items
from data.pretrain_data import DataError
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import resolve_device
from scoring import exact_match_report, format_report
from tokenizer.chat import render_chat
from weight.checkpoint import ROOT, load_model

DEFAULT_EVAL_DATA = DEFAULT_CHAT_DIR / "sft_eval.jsonl"


def choice_examples(item: dict, tokenizer, model_config) -> list:
    """One training-style example per option, (x, y, option_mask): only the option's tokens are scored.

    A raw-text item continues "context"; a chat item ("messages") is rendered with the
    chat template and the option is the assistant's answer, closed by <|im_end|>. A
    decoder-only model gets the context followed by the option as one sequence (targets
    marked by the mask); an encoder-decoder model gets (context, option) as (source, target).
    Contexts too long for the model lose their oldest tokens.
    """
    if "messages" in item:
        context = render_chat(item["messages"], tokenizer, add_generation_prompt=True)[0]
        options = [tokenizer.encode_ordinary(o) + [tokenizer.im_end_id] for o in item["options"]]
    else:
        context = tokenizer.encode_ordinary(item["context"]) or [tokenizer.eot_id]
        options = [tokenizer.encode_ordinary(o) for o in item["options"]]
    block_size = model_config.block_size
    examples = []
    for option in options:
        option = option[:block_size]                       # an option longer than the context: its start only
        if model_config.n_encoder_layer:
            examples.append((torch.tensor(context[-block_size:]), torch.tensor(option)))
            continue
        keep = max(1, block_size + 1 - len(option))        # ids are inputs + one last target
        ids = context[max(0, len(context) - keep):] + option
        x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        option_mask = torch.arange(len(y)) >= len(y) - len(option)     # only the option's tokens are scored
        examples.append((x, y, option_mask))
    return examples


@torch.no_grad()
def option_logprobs(model, tokenizer, items: list[dict], batch_size: int = 64) -> list[list[float]]:
    """log p(option | context) summed over the option's tokens, for every option of every item."""
    device = next(model.parameters()).device
    flat = [(i, j, example) for i, item in enumerate(items)
            for j, example in enumerate(choice_examples(item, tokenizer, model.config))]
    flat.sort(key=lambda row: sum(len(t) for t in row[2]))   # similar lengths together: little padding
    collate_fn = chat_collate(model.config, tokenizer)
    scores = [[0.0] * len(item["options"]) for item in items]
    model.eval()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        *inputs, targets, option_mask = [t.to(device) for t in collate_fn([example for _, _, example in chunk])]
        targets = targets.masked_fill(~option_mask, IGNORE_INDEX)
        _, loss = model(*inputs, targets=targets, reduction="none")     # (b, T) nats, 0 where ignored
        for (i, j, _), nats in zip(chunk, loss.float().sum(dim=1).tolist()):
            scores[i][j] = -nats
    return scores


def multiple_choice_report(model, tokenizer, items: list[dict]) -> dict:
    """{"accuracy", "accuracy_norm", "chance", "..._by_family", "n"}: the most likely option is the choice."""
    scores = option_logprobs(model, tokenizer, items)
    right, right_norm, total, chance = (defaultdict(float) for _ in range(4))
    for item, logps in zip(items, scores):
        per_byte = [lp / max(1, len(o.encode("utf-8"))) for lp, o in zip(logps, item["options"])]
        family = item.get("family", "user")
        right[family] += logps.index(max(logps)) == item["answer"]
        right_norm[family] += per_byte.index(max(per_byte)) == item["answer"]
        chance[family] += 1 / len(item["options"])
        total[family] += 1
    n = sum(total.values())

    def by_family(counts):
        return {f: counts[f] / total[f] for f in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, n), "accuracy_norm": sum(right_norm.values()) / max(1, n),
            "chance": sum(chance.values()) / max(1, n), "accuracy_by_family": by_family(right),
            "accuracy_norm_by_family": by_family(right_norm), "chance_by_family": by_family(chance), "n": int(n)}


def format_choice_report(report: dict) -> str:
    families = ", ".join(f"{f} {a:.0%}" for f, a in report["accuracy_norm_by_family"].items())
    return (f"multiple choice {report['accuracy_norm']:.1%} per byte, {report['accuracy']:.1%} summed "
            f"(chance {report['chance']:.1%}) on {report['n']} held-out items ({families})")


def read_choice_items(path: str | Path) -> list[dict]:
    """Multiple-choice jsonl: {"context" or "messages", "options": [...], "answer": index}; bad lines say file:line."""
    items = []
    for where, item in jsonl_records(path, 'like {"context": ..., "options": [...], "answer": 0}'):
        if not isinstance(item, dict) or not ("context" in item or "messages" in item):
            raise DataError(f'{where}: needs "context" (text) or "messages" (a chat) before the options')
        options, answer = item.get("options"), item.get("answer")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise DataError(f'{where}: "options" must be a list of at least two non-empty strings')
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise DataError(f'{where}: "answer" must be the index of the right option, 0 to {len(options) - 1}')
        items.append(item)
    return items


@dataclass
class EvalConfig:
    ckpt: str = arg("weight/sft", "checkpoint folder to evaluate")
    lora: str = arg("", "a LoRA adapter folder (made by lora.py), evaluated on top of its base; replaces --ckpt")
    tasks: str = arg("all", "chat: exact match on chat tasks; choice: multiple choice; all: both",
                     choices=["all", "chat", "choice"])
    data: str = arg(str(DEFAULT_EVAL_DATA.relative_to(ROOT)), "held-out conversations (.jsonl) for exact match")
    choice_data: str = arg(str(DEFAULT_CHOICE_PATH.relative_to(ROOT)),
                           "multiple-choice items (.jsonl: context or messages, options, answer)")
    max_new_tokens: int = arg(32, "longest answer generated")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    out: str = arg("", "write the JSON report here ('' = only print it)")


def evaluate_checkpoint(model, tokenizer, tasks: str = "all", data: str | Path = DEFAULT_EVAL_DATA,
                        choice_data: str | Path = DEFAULT_CHOICE_PATH, max_new_tokens: int = 32) -> dict:
    """{"chat": exact-match report, "choice": multiple-choice report} (the default sets are built if missing)."""
    report = {}
    if tasks in ("all", "chat"):
        if Path(data).resolve() == DEFAULT_EVAL_DATA.resolve():
            build_default_chat_data(DEFAULT_CHAT_DIR)
        report["chat"] = exact_match_report(model, tokenizer, list(read_conversations(data)), max_new_tokens)
    if tasks in ("all", "choice"):
        if Path(choice_data).resolve() == DEFAULT_CHOICE_PATH.resolve() and not DEFAULT_CHOICE_PATH.exists():
            write_jsonl(DEFAULT_CHOICE_PATH, build_choice_items())
        report["choice"] = multiple_choice_report(model, tokenizer, read_choice_items(choice_data))
    return report


def main(argv=None):
    cfg = parse_config(EvalConfig, __doc__.split("\n\n")[0].strip(), argv)
    model, tokenizer, _, _ = load_model(cfg.ckpt, cfg.lora, resolve_device(cfg.device), make_hint="python full_sft.py")
    name = cfg.lora or cfg.ckpt
    report = evaluate_checkpoint(model, tokenizer, cfg.tasks, cfg.data, cfg.choice_data, cfg.max_new_tokens)
    if "chat" in report:
        print(f"{name}: {format_report(report['chat'])}")
        for e in report["chat"]["examples"]:
            print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r} "
                  f"({'ok' if e['correct'] else 'expected ' + repr(e['expected'])})")
    if "choice" in report:
        print(f"{name}: {format_choice_report(report['choice'])}")
    if cfg.out:
        atomic_write_text(Path(cfg.out), json.dumps({"ckpt": name, **report}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main_guard(main)
