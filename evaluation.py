"""
evaluation.py -- how well does a chat checkpoint do on held-out tasks and on standard benchmarks?

    python evaluation.py                               # weight/sft on the default held-out set
    python evaluation.py --ckpt weight/pretrain        # the baseline: a model that never saw a chat
    python evaluation.py --ckpt weight/sft --data my_eval.jsonl --out report.json
    python evaluation.py --ckpt weight/pretrain --tasks choice   # multiple choice only (a base model)
    python evaluation.py --ckpt smollm2.gguf --tasks arc_easy,hellaswag --limit 500 --num_fewshot 0
    python evaluation.py --tasks chat --samples 16     # pass@k and maj@k (self-consistency) for k = 1 ... 16

Three ways to score, as JSON:

Exact match (chat tasks): the prompt is every message before the last assistant answer,
rendered with the chat template; the model answers greedily until <|im_end|>; the answer
counts only if it equals the expected text exactly (spaces at the ends ignored).

Multiple choice (data/corpus_tasks.py: which line, speaker or verse comes next): each
option is scored by its log-likelihood as a continuation of the context, and the most
likely option is the model's choice; nothing is generated. This is how PPL-based
benchmarks (HellaSwag, ARC) score base models. `accuracy` compares the summed
log-probabilities, `accuracy_norm` the log-probability per byte of the option (so long
options are not penalised for their length).

Standard benchmarks (data/benchmarks.py: ARC, HellaSwag, PIQA, WinoGrande, BoolQ, SciQ,
OpenBookQA, COPA, CommonsenseQA, Social IQa, MMLU), scored the same way with the prompts of
lm-evaluation-harness, zero- or few-shot: per task acc and acc_norm with 95% bootstrap
intervals, the chance level, and the centred score (0 = chance, 1 = all right) of the
harness's headline metric, averaged over the tasks. Each context is read once and its
keys and values are shared by all its options (continuation_logprobs).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from atomic import atomic_write_text
from data.benchmarks import INSTALL_DATA, TASKS, benchmark, benchmark_items, check_benchmark_data
from data.chat_data import (DEFAULT_CHAT_DIR, build_default_chat_data, collate_seq2seq, jsonl_records,
                            read_conversations, write_jsonl)
from data.corpus_tasks import DEFAULT_CHOICE_PATH, build_choice_items
from data.pretrain_data import DataError
from engine import left_pad
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import resolve_device
from scoring import (BOOTSTRAP_RESAMPLES, bootstrap_interval, centred, exact_match_report, format_report, sampled_answers,
                     scaling_report)
from tokenizer.chat import render_chat
from weight.checkpoint import ROOT, load_model

DEFAULT_EVAL_DATA = DEFAULT_CHAT_DIR / "sft_eval.jsonl"


def item_requests(item: dict, tokenizer) -> list[tuple[list[int], list[list[int]]]]:
    """What to score for one item, as token ids: [(context, [continuation, ...]), ...], options in order.

    Usually one context and one continuation per option: delimiter + option (a benchmark's " ", else
    nothing). A chat item ("messages") is rendered with the chat template, each option an answer closed
    by <|im_end|>. An item with a "continuation" (WinoGrande) has one context per option, the option
    filling the blank, and the same continuation scored after each.
    Context and continuation are encoded separately and joined. (lm-evaluation-harness encodes
    context + continuation whole and splits the ids at the context's length, after moving the
    context's trailing spaces into the continuation, as done here too. The two agree whenever no BPE
    merge crosses the boundary; with a GPT-2-style pre-tokenizer a continuation starting with " word"
    after "Answer:" never merges across it. Separate encoding lets the context's ids be shared.)
    """
    if "messages" in item:
        context = render_chat(item["messages"], tokenizer, add_generation_prompt=True)[0]
        return [(context, [tokenizer.encode_ordinary(o) + [tokenizer.im_end_id] for o in item["options"]])]
    if "continuation" in item:
        pairs = [(item["context"] + option, item["continuation"]) for option in item["options"]]
    else:
        pairs = [(item["context"], item.get("delimiter", "") + option) for option in item["options"]]
    requests = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip(" "))       # trailing spaces belong to the continuation
        if spaces:                                             # (the harness moves any trailing whitespace; the
                                                               # project's own items keep a final "\n" in the context)
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ids = tokenizer.encode_ordinary(context) or [tokenizer.eot_id]     # nothing before: start from <|endoftext|>
        if requests and requests[-1][0] == ids:
            requests[-1][1].append(tokenizer.encode_ordinary(continuation))
        else:
            requests.append((ids, [tokenizer.encode_ordinary(continuation)]))
    return requests


def fit_request(context: list[int], continuations: list[list[int]], block_size: int):
    """Contexts too long for the model lose their oldest tokens; a continuation longer than the whole
    context window keeps its start. The model reads context + continuation[:-1] (the last token is only
    a target), so the longest continuation decides how much context fits."""
    continuations = [c[:block_size] for c in continuations]
    keep = max(1, block_size + 1 - max(len(c) for c in continuations))
    return context[-keep:], continuations


def request_batches(requests: list, batch_size: int, block_size: int) -> list[list[int]]:
    """Request indices in batches of at most batch_size continuations, contexts of similar length together
    (little padding), each batch's longest context + longest continuation within the context window."""
    order = sorted(range(len(requests)), key=lambda r: len(requests[r][0]))
    batches, batch, rows, longest_context, longest_continuation = [], [], 0, 0, 0
    for r in order:
        context, continuations = requests[r]
        ctx, cont = max(longest_context, len(context)), max(longest_continuation, max(map(len, continuations)) - 1)
        if batch and (rows + len(continuations) > batch_size or ctx + cont > block_size):
            batches.append(batch)
            batch, rows, ctx, cont = [], 0, len(context), max(map(len, continuations)) - 1
        batch.append(r)
        rows, longest_context, longest_continuation = rows + len(continuations), ctx, cont
    return batches + [batch] if batch else batches


@torch.no_grad()
def continuation_logprobs(model, requests: list, batch_size: int = 32, pad_id: int = 0) -> list[list[float]]:
    """[(context ids, [continuation ids, ...]), ...] -> [[log p(continuation | context), ...], ...].

    Each context goes through the model once, filling a KV cache (the prefill of generation); the
    cache is copied once per continuation, and the continuations are scored in a second pass: an item
    with n options costs one context and n short continuations, not n contexts. A batch holds contexts
    of similar length, left-padded; the continuations are right-padded (causal attention never looks
    ahead, so padding after a row changes nothing in it).
    """
    if model.config.n_encoder_layer:
        return seq2seq_continuation_logprobs(model, requests, batch_size, pad_id)
    requests = [fit_request(context, continuations, model.config.block_size) for context, continuations in requests]
    device = next(model.parameters()).device
    scores = [[] for _ in requests]
    model.eval()
    for batch in request_batches(requests, batch_size, model.config.block_size):
        contexts, pad_lengths = left_pad([requests[r][0] for r in batch], pad_id, device)    # (B, Tc), (B,)
        pads = pad_lengths if bool(pad_lengths.any()) else None
        cache = model.new_kv_cache(len(batch), contexts.shape[1])
        logits, _ = model(contexts, kv_cache=cache, pad_lengths=pads, last_only=True)         # (B, 1, V)
        first = torch.log_softmax(logits[:, -1].float(), dim=-1)                              # (B, V): each row's next token
        owner = [b for b, r in enumerate(batch) for _ in requests[r][1]]                      # continuation row -> context row
        rows = [c for r in batch for c in requests[r][1]]
        logp = first[owner, [c[0] for c in rows]]                                             # (R,) the first tokens
        rest = max(len(c) for c in rows) - 1
        if rest:
            owner_rows = torch.tensor(owner, device=device)
            fork = model.new_kv_cache(len(rows), contexts.shape[1] + rest)                   # one copy per continuation
            fork.k[:, :, :, :contexts.shape[1]] = cache.k[:, owner_rows]                      # (n_layer, R, Hkv, Tc, D)
            fork.v[:, :, :, :contexts.shape[1]] = cache.v[:, owner_rows]
            fork.pos = contexts.shape[1]
            x = torch.full((len(rows), rest), pad_id, dtype=torch.long)                      # continuation[:-1]
            y = torch.full((len(rows), rest), IGNORE_INDEX, dtype=torch.long)                # continuation[1:]
            for i, c in enumerate(rows):
                x[i, :len(c) - 1], y[i, :len(c) - 1] = torch.tensor(c[:-1]), torch.tensor(c[1:])
            _, nats = model(x.to(device), targets=y.to(device), kv_cache=fork, reduction="none",
                            pad_lengths=None if pads is None else pads[owner_rows])          # (R, rest), 0 where ignored
            logp = logp - nats.float().sum(dim=1)
        for request, value in zip([r for r in batch for _ in requests[r][1]], logp.tolist()):
            scores[request].append(value)
    return scores


@torch.no_grad()
def seq2seq_continuation_logprobs(model, requests: list, batch_size: int, pad_id: int) -> list[list[float]]:
    """An encoder-decoder model reads the context as its source and scores each continuation as its target."""
    block_size, device = model.config.block_size, next(model.parameters()).device
    flat = [(r, torch.tensor(context[-block_size:]), torch.tensor(c[:block_size]))
            for r, (context, continuations) in enumerate(requests) for c in continuations]
    flat.sort(key=lambda row: len(row[1]) + len(row[2]))
    scores = [[] for _ in requests]
    model.eval()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        *inputs, targets, _ = [t.to(device) for t in collate_seq2seq([row[1:] for row in chunk], pad_id,
                                                                     model.config.decoder_start_id)]
        _, nats = model(*inputs, targets=targets, reduction="none")                          # (b, T), 0 where ignored
        for (r, _, _), value in zip(chunk, nats.float().sum(dim=1).tolist()):
            scores[r].append(-value)
    return scores


def option_logprobs(model, tokenizer, items: list[dict], batch_size: int = 32) -> list[list[float]]:
    """log p(option | context) summed over the option's tokens, for every option of every item
    (WinoGrande-style items: log p(continuation | context + option))."""
    per_item = [item_requests(item, tokenizer) for item in items]
    flat = [request for requests in per_item for request in requests]
    scores = iter(continuation_logprobs(model, flat, batch_size, tokenizer.eot_id))
    return [[value for _ in requests for value in next(scores)] for requests in per_item]


def choice_outcomes(model, tokenizer, items: list[dict], batch_size: int = 32) -> list[dict]:
    """Per item: {"correct": the most likely option is the answer, "correct_norm": the same per byte
    of the option (of the continuation, for WinoGrande-style items), "chance": 1 / number of options}."""
    outcomes = []
    for item, logps in zip(items, option_logprobs(model, tokenizer, items, batch_size)):
        scored = [item["continuation"]] * len(logps) if "continuation" in item else item["options"]
        per_byte = [lp / max(1, len(text.encode("utf-8"))) for lp, text in zip(logps, scored)]
        outcomes.append({"correct": float(logps.index(max(logps)) == item["answer"]),
                         "correct_norm": float(per_byte.index(max(per_byte)) == item["answer"]),
                         "chance": 1 / len(item["options"])})
    return outcomes


def multiple_choice_report(model, tokenizer, items: list[dict], batch_size: int = 32) -> dict:
    """{"accuracy", "accuracy_norm", "chance", "..._by_family", "n"}: the most likely option is the choice."""
    right, right_norm, total, chance = (defaultdict(float) for _ in range(4))
    for item, outcome in zip(items, choice_outcomes(model, tokenizer, items, batch_size)):
        family = item.get("family", "user")
        right[family] += outcome["correct"]
        right_norm[family] += outcome["correct_norm"]
        chance[family] += outcome["chance"]
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
        for key in ("delimiter", "continuation"):
            if not isinstance(item.get(key, ""), str):
                raise DataError(f'{where}: "{key}" must be a string (see data/benchmarks.py)')
        items.append(item)
    return items


def parse_tasks(tasks: str) -> tuple[list[str], list[str]]:
    """--tasks -> (the project's own sets among "chat", "choice"; the standard benchmarks, in order)."""
    own, benchmarks = [], []
    for name in (t.strip() for t in tasks.split(",")):
        for one in (["chat", "choice"] if name == "all" else [name]):
            if one in ("chat", "choice"):
                own += [one] if one not in own else []
            elif one:
                benchmark(one)                                     # an unknown name: one line listing the known ones
                benchmarks += [one] if one not in benchmarks else []
    if not own and not benchmarks:
        raise ValueError("--tasks names nothing: give all, chat, choice or benchmarks such as arc_easy,hellaswag")
    return own, benchmarks


def benchmark_report(model, tokenizer, names: list[str], limit: int = 0, num_fewshot: int = 0,
                     batch_size: int = 32) -> dict:
    """Each benchmark's accuracy (summed log-prob) and accuracy per byte, with 95% bootstrap intervals over its
    items, its chance level (the mean of 1 / number of options) and its centred score: the harness's headline
    metric for the task (acc or acc_norm), 0 at chance and 1 for all right; and the centred average."""
    tasks = {}
    for name in names:
        started = time.time()
        items = benchmark_items(name, limit, num_fewshot)
        outcomes = choice_outcomes(model, tokenizer, items, batch_size)
        correct, correct_norm = [o["correct"] for o in outcomes], [o["correct_norm"] for o in outcomes]
        acc, acc_norm = sum(correct) / len(items), sum(correct_norm) / len(items)
        chance = sum(o["chance"] for o in outcomes) / len(items)
        task = benchmark(name)
        tasks[name] = {"n": len(items), "shots": num_fewshot, "acc": acc, "acc_ci": bootstrap_interval(correct),
                       "acc_norm": acc_norm, "acc_norm_ci": bootstrap_interval(correct_norm), "chance": chance,
                       "metric": task.metric, "centred": centred(acc_norm if task.metric == "acc_norm" else acc, chance),
                       "split": task.split, "licence": task.licence, "seconds": round(time.time() - started, 1)}
        print(f"{name}: {len(items)} items, {num_fewshot}-shot, scored in {time.time() - started:.0f} s", flush=True)
    return {"tasks": tasks, "centred_average": sum(t["centred"] for t in tasks.values()) / len(tasks),
            "limit": limit, "num_fewshot": num_fewshot, "bootstrap_resamples": BOOTSTRAP_RESAMPLES}


def format_benchmark_table(report: dict) -> str:
    """The benchmark report as a markdown table (percentages; [95% interval]; * = the harness's headline metric)."""
    def pct(value, interval, headline):
        return f"{100 * value:.1f}{'*' if headline else ''} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    rows = [("task", "n", "shots", "acc [95% CI]", "acc_norm [95% CI]", "chance", "centred")]
    for name, t in report["tasks"].items():
        rows.append((name, str(t["n"]), str(t["shots"]), pct(t["acc"], t["acc_ci"], t["metric"] == "acc"),
                     pct(t["acc_norm"], t["acc_norm_ci"], t["metric"] == "acc_norm"), f"{100 * t['chance']:.1f}",
                     f"{t['centred']:.3f}"))
    rows.append(("centred average", "", "", "", "", "", f"{report['centred_average']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + ("\n* the harness's headline metric for the task; centred = (it - chance) / (1 - chance); "
                                f"intervals: {report['bootstrap_resamples']} bootstrap resamples of the items")


@dataclass
class EvalConfig:
    ckpt: str = arg("weight/sft", "checkpoint folder (or a Hugging Face model folder, or a .gguf file) to evaluate")
    lora: str = arg("", "a LoRA adapter folder (made by lora.py), evaluated on top of its base; replaces --ckpt")
    tasks: str = arg("all", "chat: exact match on chat tasks; choice: multiple choice; all: both; or standard "
                            "benchmarks, comma-separated: " + ",".join(TASKS) + " (data: " + INSTALL_DATA + ")")
    data: str = arg(str(DEFAULT_EVAL_DATA.relative_to(ROOT)), "held-out conversations (.jsonl) for exact match")
    choice_data: str = arg(str(DEFAULT_CHOICE_PATH.relative_to(ROOT)),
                           "multiple-choice items (.jsonl: context or messages, options, answer)")
    limit: int = arg(0, "benchmarks: score only the first N items of each (0 = all)")
    num_fewshot: int = arg(0, "benchmarks: solved examples before each question (drawn with a fixed seed)")
    batch_size: int = arg(32, "multiple choice: options scored per forward pass")
    max_new_tokens: int = arg(32, "longest answer generated")
    samples: int = arg(0, "chat tasks: also sample N answers per item (temperature --temperature) and report pass@k "
                          "and maj@k (self-consistency) for k = 1, 2, 4, ... N, plotted (0 = off)")
    temperature: float = arg(1.0, "with --samples: the sampling temperature")
    plot: str = arg("weight/eval/scaling.png", "with --samples: where the pass@k / maj@k plot goes")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    out: str = arg("", "write the JSON report here ('' = only print it)")


def evaluate_checkpoint(model, tokenizer, tasks: str = "all", data: str | Path = DEFAULT_EVAL_DATA,
                        choice_data: str | Path = DEFAULT_CHOICE_PATH, max_new_tokens: int = 32, limit: int = 0,
                        num_fewshot: int = 0, batch_size: int = 32) -> dict:
    """{"chat": exact-match report, "choice": multiple-choice report, "benchmarks": benchmark report},
    as --tasks asks (the default chat and choice sets are built if missing)."""
    own, benchmarks = parse_tasks(tasks)
    report = {}
    if "chat" in own:
        if Path(data).resolve() == DEFAULT_EVAL_DATA.resolve():
            build_default_chat_data(DEFAULT_CHAT_DIR)
        chat = exact_match_report(model, tokenizer, list(read_conversations(data)), max_new_tokens)
        report["chat"] = {k: v for k, v in chat.items() if k != "right"}   # per item: 400 lines of metrics.json
    if "choice" in own:
        if Path(choice_data).resolve() == DEFAULT_CHOICE_PATH.resolve() and not DEFAULT_CHOICE_PATH.exists():
            write_jsonl(DEFAULT_CHOICE_PATH, build_choice_items())
        report["choice"] = multiple_choice_report(model, tokenizer, read_choice_items(choice_data), batch_size)
    if benchmarks:
        report["benchmarks"] = benchmark_report(model, tokenizer, benchmarks, limit, num_fewshot, batch_size)
    return report


def main(argv=None):
    cfg = parse_config(EvalConfig, __doc__.split("\n\n")[0].strip(), argv)
    if cfg.samples < 0 or (cfg.samples and cfg.temperature <= 0):
        raise ValueError(f"--samples {cfg.samples} --temperature {cfg.temperature:g}: sampling needs --samples >= 1 "
                         f"and a temperature above 0 (at 0 every sample is the greedy answer)")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if parse_tasks(cfg.tasks)[1]:                                # a wrong name or missing data stops here,
        check_benchmark_data()                                    # before the model loads
    model, tokenizer, _, _ = load_model(cfg.ckpt, cfg.lora, resolve_device(cfg.device), make_hint="python full_sft.py")
    name = cfg.lora or cfg.ckpt
    report = evaluate_checkpoint(model, tokenizer, cfg.tasks, cfg.data, cfg.choice_data, cfg.max_new_tokens,
                                 cfg.limit, cfg.num_fewshot, cfg.batch_size)
    if "chat" in report:
        print(f"{name}: {format_report(report['chat'])}")
        for e in report["chat"]["examples"]:
            print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r} "
                  f"({'ok' if e['correct'] else 'expected ' + repr(e['expected'])})")
    if "choice" in report:
        print(f"{name}: {format_choice_report(report['choice'])}")
    if "benchmarks" in report:
        print(f"\n{name}:\n{format_benchmark_table(report['benchmarks'])}")
    if cfg.samples and "chat" in report:
        report["scaling"] = scaling(model, tokenizer, cfg, name)
    if cfg.out:
        atomic_write_text(Path(cfg.out), json.dumps({"ckpt": name, **report}, indent=2, ensure_ascii=False))


def scaling(model, tokenizer, cfg: EvalConfig, name: str) -> dict:
    """Inference-time scaling on the chat tasks: n samples per item -> pass@k and maj@k for k = 1, 2, 4, ..."""
    records = list(read_conversations(cfg.data))
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= cfg.samples]
    started = time.time()
    samples = sampled_answers(model, tokenizer, [r["conversations"] for r in records], cfg.samples,
                              cfg.max_new_tokens, cfg.temperature)
    report = scaling_report(records, samples, ks)
    print(f"\n{name}: {cfg.samples} samples per item at temperature {cfg.temperature:g} "
          f"({time.time() - started:.0f} s)")
    print("\n".join(f"  k={k:<3} pass@k {report['pass_at_k'][k]:6.1%}   maj@k {report['maj_at_k'][k]:6.1%}" for k in ks))
    plot_scaling(report, Path(cfg.plot), name)
    print(f"-> {cfg.plot}")
    return report


def plot_scaling(report: dict, path: Path, title: str):
    """pass@k and maj@k against k (log scale), overall and for each task family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = report["ks"]
    families = sorted(report["pass_at_k_by_family"][ks[0]])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, label in zip(axes, ("pass_at_k", "maj_at_k"), ("pass@k: one of k samples is right",
                                                                 "maj@k: the majority of k samples is right")):
        ax.plot(ks, [report[key][k] for k in ks], "k-o", lw=2.5, label="all")
        for f in families:
            ax.plot(ks, [report[f"{key}_by_family"][k][f] for k in ks], "-", marker=".", lw=1, label=f)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (samples)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main_guard(main)
