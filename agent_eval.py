"""
agent_eval.py -- does retrieval help, and do tools help? Measured side by side, on questions no model has seen.

    python agent_eval.py --task facts --ckpt smollm2 --limit 40      # retrieval: recall@k, accuracy with/without
    python agent_eval.py --task addition --ckpt weight/sft_tools --tools calculator   # (data/tool_data.py)
    python agent_eval.py --task addition --ckpt weight/sft_direct                     # the same questions, no tool

facts: data/facts.py invents countries (capital, founder, animal, export, river), one document
each, and asks about them. Retrieval is scored first, without generating: recall@k = how often
the question's own document is among the k passages found, by BM25 and by the model's own
mean-pooled embeddings (retrieval.py). Then the model answers each question twice, greedily:
alone, and with the k BM25 passages in the prompt; an answer is right if it contains the
invented name (data.facts.answer_is_right).

addition: the held-out questions of data/tool_data.py; with --tools calculator the agent loop
runs (agent.py; the model may call the calculator), without it the model answers directly. An
answer is right if the sum appears in it as a whole number.

Both print one line per measure and write the JSON report to --out if given.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent import engine_answerer, run_agent
from atomic import atomic_write_text
from data.facts import answer_is_right, generate_facts
from data.tool_data import DEFAULT_TOOL_DIR, read_addition_questions
from engine import Engine, LoadConfig, SamplingParams
from flags import arg, main_guard, parse_config
from retrieval import Index, with_sources
from tools import builtin_toolbox


@dataclass
class AgentEvalConfig(LoadConfig):
    task: str = arg("facts", "facts: retrieval on invented facts; addition: calculator use (data/tool_data.py)",
                    choices=["facts", "addition"])
    ckpt: str = arg("smollm2", "checkpoint folder, .gguf file or short name to evaluate")
    max_new_tokens: int = arg(96, "longest answer (per model call; a calculator call is about 60 tokens with the "
                                   "project's 4,096-token vocabulary: a shorter limit cuts it)")
    limit: int = arg(40, "questions answered (0 = all); retrieval recall is scored on all of them")
    n_countries: int = arg(20, "facts: invented countries (5 questions each)")
    seed: int = arg(0, "facts: which invented world")
    k: int = arg(3, "facts: passages retrieved per question")
    dense: bool = arg(True, "facts: also score dense retrieval with the model's embeddings")
    data: str = arg(str(DEFAULT_TOOL_DIR / "eval_tools.jsonl"), "addition: held-out questions (python -m data.tool_data)")
    tools: str = arg("", "addition: 'calculator' runs the agent loop with it; '' answers directly")
    tool_schemas: bool = arg(True, "addition: list the schema in the prompt (--no-tool_schemas for --no_schema data)")
    max_tool_steps: int = arg(3, "addition: most model calls per question")
    batch_size: int = arg(8, "answers generated together")
    out: str = arg("", "write the JSON report here ('' = only print it)")


def recall_at_k(index: Index, questions: list[dict], k: int, method: str) -> float:
    """Share of questions whose own document is among the k passages found."""
    found = [any(h.chunk.source == q["source"] for h in index.search(q["question"], k, method)) for q in questions]
    return sum(found) / len(found)


def answers(engine: Engine, conversations: list[list[dict]], params: SamplingParams, batch_size: int) -> list[str]:
    return [c.text for c in engine.complete([engine.chat_ids(m) for m in conversations], params, batch_size)]


def facts_report(engine: Engine, cfg: AgentEvalConfig, params: SamplingParams) -> dict:
    documents, questions = generate_facts(cfg.n_countries, cfg.seed)
    index = Index.from_texts(sorted(documents.items()))
    methods = ["bm25"] + ["dense"] * cfg.dense
    if cfg.dense:
        index.add_dense(engine.model, engine.tokenizer)
    report = {"task": "facts", "documents": len(documents), "passages": len(index), "questions": len(questions),
              "k": cfg.k, "recall_at_1": {m: recall_at_k(index, questions, 1, m) for m in methods},
              "recall_at_k": {m: recall_at_k(index, questions, cfg.k, m) for m in methods}}
    asked = questions[:cfg.limit or None]
    plain = [[{"role": "user", "content": q["question"]}] for q in asked]
    grounded = [[{"role": "user", "content": with_sources(q["question"], index.search(q["question"], cfg.k))}]
                for q in asked]
    start = time.perf_counter()
    without, with_docs = answers(engine, plain, params, cfg.batch_size), answers(engine, grounded, params, cfg.batch_size)
    report["answered"] = len(asked)
    report["accuracy"] = {"without_retrieval": sum(map(answer_is_right, without, [q["answer"] for q in asked])) / len(asked),
                          "with_retrieval": sum(map(answer_is_right, with_docs, [q["answer"] for q in asked])) / len(asked)}
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["examples"] = [{"question": q["question"], "expected": q["answer"], "without": a, "with": b}
                          for q, a, b in list(zip(asked, without, with_docs))[:3]]
    return report


def contains_number(answer: str, expected: str) -> bool:
    """The number appears in the answer as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(expected)}(?!\d)", answer.replace(",", "")) is not None


def addition_report(engine: Engine, cfg: AgentEvalConfig, params: SamplingParams) -> dict:
    items = read_addition_questions(cfg.data)[:cfg.limit or None]
    start = time.perf_counter()
    if cfg.tools:
        toolbox = builtin_toolbox([t.strip() for t in cfg.tools.split(",")])
        answerer = engine_answerer(engine, params, offer_schemas=cfg.tool_schemas)
        results = [run_agent(answerer, messages, toolbox, cfg.max_tool_steps) for messages, _ in items]
        texts = [r.answer for r in results]
        called = sum(bool(r.calls) for r in results) / len(results)
    else:
        # without tools the question is asked without the tools' system prompt (the direct twin's format)
        texts = answers(engine, [[m for m in messages if m["role"] != "system"] for messages, _ in items],
                        params, cfg.batch_size)
        called = 0.0
    right = [contains_number(text, expected) for text, (_, expected) in zip(texts, items)]
    return {"task": "addition", "data": cfg.data, "tools": cfg.tools or "none", "answered": len(items),
            "accuracy": sum(right) / len(right), "called_a_tool": called,
            "seconds": round(time.perf_counter() - start, 1),
            "examples": [{"question": m[-1]["content"], "expected": e, "answer": t} for (m, e), t in list(zip(items, texts))[:3]]}


def main(argv=None):
    cfg = parse_config(AgentEvalConfig, __doc__.split("\n\n")[0].strip(), argv)
    for name in ("k", "batch_size", "max_tool_steps", "n_countries", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.task == "addition" and not Path(cfg.data).exists():        # before the model loads: say it at once
        raise FileNotFoundError(f"--data {cfg.data} not found: make the questions with python -m data.tool_data")
    engine = Engine.load(cfg)
    if not engine.chat:
        raise ValueError(f"{cfg.ckpt} is not a chat model: agent_eval.py asks questions (use a chat checkpoint, "
                         f"or --chat on)")
    params = SamplingParams.greedy(cfg.max_new_tokens)
    report = facts_report(engine, cfg, params) if cfg.task == "facts" else addition_report(engine, cfg, params)
    report["model"] = engine.name
    if cfg.task == "facts":
        for at in ("1", "k"):
            recall = ", ".join(f"{name} {value:.0%}" for name, value in report[f"recall_at_{at}"].items())
            print(f"retrieval recall@{cfg.k if at == 'k' else 1} over {report['questions']} questions "
                  f"({report['passages']} passages): {recall}")
        print(f"answer accuracy over {report['answered']} questions: without retrieval "
              f"{report['accuracy']['without_retrieval']:.0%}, with retrieval {report['accuracy']['with_retrieval']:.0%}")
    else:
        print(f"addition accuracy over {report['answered']} held-out questions (tools: {report['tools']}): "
              f"{report['accuracy']:.0%}; a tool was called in {report['called_a_tool']:.0%}")
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main_guard(main)
