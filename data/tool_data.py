"""
data/tool_data.py -- chat data that teaches a model to call the calculator for addition, and its no-tool twin.

    python -m data.tool_data --no_schema                   # -> data/default/tools/*.jsonl
    python full_sft.py --data data/default/tools/train_tools.jsonl --eval_data data/default/tools/eval_tools.jsonl \\
                       --max_steps 800 --batch_size 16 --out_dir weight/sft_tools
    python full_sft.py --data data/default/tools/train_direct.jsonl --eval_data data/default/tools/eval_direct.jsonl \\
                       --max_steps 800 --batch_size 16 --out_dir weight/sft_direct   # the same questions, no tool
    python agent_eval.py --task addition --ckpt weight/sft_tools --tools calculator --no-tool_schemas   # 100%
    python agent_eval.py --task addition --ckpt weight/sft_direct                                       # 0%

(measured on 200 held-out questions, docs/tools.md). A small model cannot add two four-digit
numbers it has never seen (it would have to learn carrying from examples); it can learn to copy
them into a call. A tool conversation is

    system     the calculator's schema (tokenizer.chat.tools_system_text)
    user       What is 4821 + 3907?
    assistant  <tool_call>\\n{"name": "calculator", "arguments": {"expression": "4821 + 3907"}}\\n</tool_call>
    user       <tool_response>\\n8728\\n</tool_response>
    assistant  4821 + 3907 = 8728.

(calls and results written as text in the turns: the same tokens as the structured messages,
and any chat jsonl reader, full_sft.py's included, takes them.) The schema in the system prompt
is about 490 tokens with the project's 4096-token vocabulary, more than a 256-token context:
`--no_schema` leaves it out (the model then learns the one tool it has by heart; run the agent
with --no-tool_schemas to match). The direct twin has the same
questions with the last line as the only answer. Held out: numbers n with n % 7 == 3 never
appear in training; every evaluation question adds two of them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data.chat_data import DEFAULT_DIR, write_jsonl
from tokenizer.chat import tool_call_text, tool_response_text, tools_system_text

DEFAULT_TOOL_DIR = DEFAULT_DIR / "tools"
# the calculator as tools.py offers it (tools.py is above data/ in the layers; a test checks they agree)
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly and return the number.",
    "parameters": {"type": "object",
                   "properties": {"expression": {"type": "string", "description": "arithmetic, e.g. 12*(3+4) or sqrt(2)/2"}},
                   "required": ["expression"]}}}
QUESTIONS = {"en": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a}+{b}.", "What do {a} and {b} add up to?"],
             "zh": ["{a}加{b}等于多少？", "请计算{a}+{b}。"]}
LOW, HIGH = 100, 9999


def is_held_out_number(n: int) -> bool:
    return n % 7 == 3


def addition_pair(rng: random.Random, held_out: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if is_held_out_number(a) == held_out and is_held_out_number(b) == held_out:
            return a, b


def conversations(a: int, b: int, question: str, schema: bool = True) -> tuple[list[dict], list[dict]]:
    """(with the calculator, direct) conversations for one question; schema=False: no system prompt."""
    answer = f"{a} + {b} = {a + b}."
    system = [{"role": "system", "content": tools_system_text("", [CALCULATOR])}] if schema else []
    with_tool = system + [
                 {"role": "user", "content": question},
                 {"role": "assistant", "content": tool_call_text("calculator", {"expression": f"{a} + {b}"})},
                 {"role": "user", "content": tool_response_text(str(a + b))},
                 {"role": "assistant", "content": answer}]
    direct = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return with_tool, direct


def generate_tool_data(n_train: int = 4000, n_eval: int = 200, seed: int = 0, schema: bool = True) -> dict[str, list[dict]]:
    """{"train_tools", "eval_tools", "train_direct", "eval_direct"}: records with "conversations",
    "family", "lang", and "expected" (the sum, as text, for agent_eval.py)."""
    rng = random.Random(seed)
    out = {name: [] for name in ("train_tools", "eval_tools", "train_direct", "eval_direct")}
    for split, n in (("train", n_train), ("eval", n_eval)):
        for _ in range(n):
            a, b = addition_pair(rng, held_out=split == "eval")
            lang = rng.choice(["en", "en", "zh"])
            question = rng.choice(QUESTIONS[lang]).format(a=a, b=b)
            with_tool, direct = conversations(a, b, question, schema)
            common = {"lang": lang, "expected": str(a + b)}
            out[f"{split}_tools"].append({"conversations": with_tool, "family": "addition_tools", **common})
            out[f"{split}_direct"].append({"conversations": direct, "family": "addition", **common})
    return out


def write_tool_data(out_dir: str | Path = DEFAULT_TOOL_DIR, **kwargs) -> dict[str, Path]:
    """Write the four files (regenerated every time: they take milliseconds and always match the code)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in generate_tool_data(**kwargs).items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths


def read_addition_questions(path: str | Path) -> list[tuple[list[dict], str]]:
    """(the conversation up to the question, the expected sum) of each record of an eval file."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["conversations"]
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            items.append((messages[:first_user + 1], str(record["expected"])))
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            raise ValueError(f"{path}:{number}: not an addition record of data/tool_data.py (needs \"conversations\" "
                             f"with a user turn and \"expected\"): make the file with python -m data.tool_data") from None
    return items


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the calculator-use chat data (and its no-tool twin)")
    parser.add_argument("--out_dir", default=str(DEFAULT_TOOL_DIR))
    parser.add_argument("--n_train", type=int, default=4000)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_schema", action="store_true", help="no system prompt listing the calculator "
                        "(for a short context; run the agent with --no-tool_schemas)")
    args = parser.parse_args()
    for name, path in write_tool_data(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                                      schema=not args.no_schema).items():
        print(f"{path}")
