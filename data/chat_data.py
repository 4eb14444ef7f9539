"""
Chat data: generated task families whose answers can be checked exactly, and user jsonl.

No chat dataset can be downloaded here, so the default SFT data is generated. Each
family has English and Chinese templates; held-out items use new words, numbers and
names (a fixed 1 in 5 of each, chosen by a hash), never only new phrasings:

    repeat    "Repeat this word 3 times:\nmoon"           -> "moon\nmoon\nmoon"
    last      "Which word comes last?\nsun\nsea\nmoon"     -> "moon"
    recall    "My name is Kavi." ... "What is my name?"    -> "Kavi"   (multi-turn)
    identity  "Who are you?"                               -> the persona's answer
    add       "What is 23 + 58?"                           -> "81"     (stays hard)
    upper     "Write this word in capital letters:\ncrown" -> "CROWN"  (stays hard)
    reverse   "Spell this word backwards:\ncat"            -> "tac"    (stays hard)
    speaker   a passage of a play + 'Who says "..."?'      -> "PAROLLES" (held out: validation text)

Words stand at the start of a line in prompts and answers alike: a BPE tokenizer
splits " moon" (after a space) and "moon" (after a newline) into different tokens,
so this layout makes copying a word copying its tokens. Upper case and reversal need
the letters inside tokens, which a small BPE model barely knows: they stay hard.

Records are written in the standard SFT format, one per line:
    {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "family": "add", "lang": "en"}
so real data drops in. `read_conversations` reads the formats chat datasets come in, as
.jsonl (one record per line) or .json (one JSON array of records):
    OpenAI     {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    minimind   {"conversations": [{"role": ..., "content": ...}, ...]}
    ShareGPT   {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": ..., "output": ...}
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from atomic import atomic_path
from model import IGNORE_INDEX
from tokenizer.chat import check_messages, render_chat

from .corpus_tasks import DEFAULT_DIR, speaker_records
from .cot import with_trace
from .persona import persona_data
from .pretrain_data import DataError, check_file_has_content

DEFAULT_CHAT_DIR = DEFAULT_DIR / "chat"                           # generated chat data, built by the chat stages
DEFAULT_PERSONA_DIR = DEFAULT_DIR / "persona"                     # the persona lesson (--data persona)
EVAL_ONLY_ONE_IN = 5         # 1 in 5 words / number pairs / names is only ever used for evaluation
HOLD_OUT_EVERY_NTH = 20      # a --data file given without --eval_data: every 20th record is held out
WORD_FAMILIES = ("repeat", "last", "recall", "identity", "add", "upper", "reverse")
FAMILIES = WORD_FAMILIES + ("speaker",)   # speaker: "who says this line?" on a passage of a play (corpus_tasks.py)
NEW_SKILL = "first"          # not in the SFT data: the skill lora.py teaches ("Which word comes first?")
PERSONA = {"en": "I am Workshop, a small language model trained from scratch.",
           "zh": "我是 Workshop，一个从零开始训练的小语言模型。"}
NUMBER_WORDS_ZH = {2: "两", 3: "三", 4: "四"}
# what a chat record looks like, for the messages that refuse a file or a line
CHAT_RECORD = ('like {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
               '(or "conversations" with role/content or ShareGPT from/value, or alpaca {"instruction", "input", '
               '"output"})')
PAIR_RECORD = 'like {"chosen": [...messages], "rejected": [...messages]}'
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

TEMPLATES = {
    "upper": {"en": ["Write this word in capital letters:\n{w}", "Uppercase:\n{w}"],
              "zh": ["把这个词写成大写字母：\n{w}", "大写：\n{w}"]},
    "repeat": {"en": ["Repeat this word {n} times:\n{w}", "Say it {n} times:\n{w}", "Write {n} times:\n{w}"],
               "zh": ["把这个词重复{nz}遍：\n{w}", "说{nz}遍：\n{w}", "请写{nz}次：\n{w}"]},
    "first": {"en": ["Which word comes first?\n{ws}", "Give the first word of this list:\n{ws}"],
              "zh": ["第一个词是什么？\n{ws}", "说出这个列表的第一个词：\n{ws}"]},
    "last": {"en": ["Which word comes last?\n{ws}", "Give the last word of this list:\n{ws}"],
             "zh": ["最后一个词是什么？\n{ws}", "说出这个列表的最后一个词：\n{ws}"]},
    "add": {"en": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."],
            "zh": ["{a} 加 {b} 等于多少？", "计算 {a} + {b}。", "{a} 和 {b} 的和是多少？"]},
    "reverse": {"en": ["Spell this word backwards:\n{w}", "Reverse the letters:\n{w}"],
                "zh": ["把这个词的字母倒过来写：\n{w}", "倒序拼写：\n{w}"]},
}
RECALL = {"en": ("My name is {name}.", "Nice to meet you, {name}!", "What is my name?"),
          "zh": ("我叫{name}。", "你好，{name}！", "我叫什么名字？")}
# identity has no numbers or words to hold out, so its held-out items are new phrasings
IDENTITY_TRAIN = {"en": ["Who are you?", "What are you?", "Introduce yourself.", "Tell me who you are."],
                  "zh": ["你是谁？", "你是什么？", "请介绍一下你自己。", "告诉我你是谁。"]}
IDENTITY_HELD_OUT = {"en": ["What is your name and what are you?", "Please say who you are."],
                     "zh": ["你叫什么，是什么？", "请说说你是谁。"]}
SYLLABLES = ["ka", "ri", "mo", "len", "sa", "vi", "to", "na", "bel", "do", "mi", "ra", "zu", "fen", "lo", "ti"]


def is_held_out(key: str) -> bool:
    """A stable 1-in-EVAL_ONLY_ONE_IN choice (crc32, so it is the same on every machine and run)."""
    return zlib.crc32(key.encode("utf-8")) % EVAL_ONLY_ONE_IN == 0


def corpus_words(text: str, n: int = 3000) -> list[str]:
    """The n most frequent lower-case words of 3-8 letters: the vocabulary of the word tasks."""
    counts = Counter(re.findall(r"\b[a-z]{3,8}\b", text))
    return sorted(w for w, _ in counts.most_common(n))


def default_words() -> list[str]:
    """The word tasks' vocabulary, from the default English corpus (one clear line if it is missing)."""
    english = DEFAULT_DIR / "en_train.txt"
    if not english.exists():
        raise FileNotFoundError(f"{english} not found: run `python pretrain.py` first (it builds the corpus)")
    return corpus_words(english.read_text(encoding="utf-8"))


def synthetic_names(n: int = 400) -> list[str]:
    """Made-up names from syllables ("Kavi", "Molen"): never seen in pretraining, so recall is real copying."""
    names = {(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b}
    return sorted(names)[:n]


def make_item(family: str, lang: str, rng: random.Random, pool: dict) -> dict:
    """One conversation of a family, drawn from a pool (the training or the held-out one):
    pool["words"] word list, pool["pairs"] number pairs (a, b), pool["names"], pool["identity"]
    questions per language."""
    if family in ("upper", "repeat", "reverse", "last", "first"):
        w = rng.choice(pool["words"])
        n = rng.randint(2, 4)
        listed = rng.sample(pool["words"], n)
        prompt = rng.choice(TEMPLATES[family][lang]).format(w=w, n=n, nz=NUMBER_WORDS_ZH[n], ws="\n".join(listed))
        answer = {"upper": w.upper(), "repeat": "\n".join([w] * n), "reverse": w[::-1], "last": listed[-1],
                  "first": listed[0]}[family]
        messages = [("user", prompt), ("assistant", answer)]
    elif family == "add":
        a, b = rng.choice(pool["pairs"])
        prompt = rng.choice(TEMPLATES["add"][lang]).format(a=a, b=b)
        messages = [("user", prompt), ("assistant", str(a + b))]
    elif family == "recall":
        name = rng.choice(pool["names"])
        intro, greeting, question = (t.format(name=name) for t in RECALL[lang])
        messages = [("user", intro), ("assistant", greeting), ("user", question), ("assistant", name)]
    elif family == "identity":
        messages = [("user", rng.choice(pool["identity"][lang])), ("assistant", PERSONA[lang])]
    else:
        raise ValueError(f"unknown task family {family!r}; families are {', '.join(FAMILIES)}")
    return {"conversations": [{"role": r, "content": c} for r, c in messages], "family": family, "lang": lang}


def generate_chat_data(words: list[str], n_train: int, n_eval_per_family: int, seed: int = 0,
                       zh_share: float = 0.3, families=WORD_FAMILIES,
                       plays: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held_out) conversations; the held-out ones use only held-out words, numbers and names.

    The "speaker" family needs play text: plays = {"train": text, "eval": text}, the held-out
    passages coming from the eval text only. Deterministic for a given seed and inputs.
    """
    rng = random.Random(seed)
    if "speaker" in families and not plays:
        raise ValueError('the "speaker" family needs play text: pass plays={"train": ..., "eval": ...}')
    speaker_items = {}
    if "speaker" in families:
        per_family = {"train": n_train // len(families) + 1, "eval": n_eval_per_family}
        speaker_items = {split: speaker_records(plays[split], n, rng, zh_share) for split, n in per_family.items()}
    names = synthetic_names()
    pools = {}
    for split in ("train", "eval"):
        keep = (lambda key: is_held_out(key)) if split == "eval" else (lambda key: not is_held_out(key))
        pairs = [(a, b) for a in range(100) for b in range(100) if keep(f"{a}+{b}")]
        pools[split] = {"words": [w for w in words if keep(w)], "names": [n for n in names if keep(n)],
                        "pairs": pairs,
                        "identity": IDENTITY_HELD_OUT if split == "eval" else IDENTITY_TRAIN}

    def item(family: str, split: str) -> dict:
        lang = "zh" if rng.random() < zh_share else "en"
        if family == "speaker":
            return speaker_items[split].pop()
        return make_item(family, lang, rng, pools[split])

    train = [item(families[i % len(families)], "train") for i in range(n_train)]
    rng.shuffle(train)
    held_out = [item(family, "eval") for family in families for _ in range(n_eval_per_family)]
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written to a temp file and renamed (never half a file)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_default_chat_data(out_dir: Path = DEFAULT_CHAT_DIR, n_train: int = 20000,
                            n_eval_per_family: int = 50, seed: int = 0, verbose: bool = True) -> dict[str, Path]:
    """Write out_dir/sft_train.jsonl and out_dir/sft_eval.jsonl unless they exist."""
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "sft_train.jsonl", "eval": out_dir / "sft_eval.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    words = default_words()
    plays = {split: (DEFAULT_DIR / f"en_{name}.txt").read_text(encoding="utf-8")
             for split, name in (("train", "train"), ("eval", "val"))}
    train, held_out = generate_chat_data(words, n_train, n_eval_per_family, seed, families=FAMILIES, plays=plays)
    write_jsonl(paths["eval"], held_out)
    write_jsonl(paths["train"], train)
    if verbose:
        print(f"chat data: {len(train):,} training and {len(held_out):,} held-out conversations "
              f"({', '.join(FAMILIES)}) -> {out_dir}")
    return paths


def chat_token_stream(path: Path, tokenizer) -> np.ndarray:
    """Every conversation of a chat file rendered with the chat template (its special tokens
    included) and ended with <|endoftext|>, one after another: the chat share of pretraining's
    batches (pretrain.py --chat_share), read like any text."""
    ids = []
    for record in read_conversations(path):
        ids += render_chat(record["conversations"], tokenizer, where=str(path))[0] + [tokenizer.eot_id]
    return np.array(ids, dtype=np.int64)


def jsonl_records(path: str | Path, expected: str) -> Iterator[tuple[str, object]]:
    """Yield (where, parsed JSON) for every record of a .jsonl file (one per line, where = "file:line")
    or a .json file holding one JSON array (where = "file: record N"). expected: what a record
    looks like, for the messages; a bad file or line stops with one line saying where and what to do."""
    path = Path(path)
    check_record_file(path, expected)
    if path.suffix == ".json" and _starts_with_bracket(path):
        yield from _array_records(path, expected)
    else:                            # .jsonl, or a JSON Lines file named .json (many datasets are)
        yield from _line_records(path, expected)


def check_record_file(path: Path, expected: str) -> None:
    """Refuse, in one line, a path that is not a .jsonl / .json file of records."""
    check_file_has_content(path, "give a .jsonl or .json file")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: {path.suffix or 'a file without a suffix'} is not read here; convert it to "
                        f".jsonl with one JSON object per line, {expected}, or to a .json file holding a list "
                        f"of them")


def _starts_with_bracket(path: Path) -> bool:
    """True if the file's first character (after a byte-order mark and spaces) is "[": a JSON array."""
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _line_records(path: Path, expected: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{where}: bytes that are not UTF-8; convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                or_array = "; or make the whole .json file one JSON array [...]" if path.suffix == ".json" else ""
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); "
                                f"each line must be one object {expected}{or_array}") from None


def _array_records(path: Path, expected: str) -> Iterator[tuple[str, object]]:
    # a JSON array cannot be read piece by piece with the standard library: it is parsed whole
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: bytes that are not UTF-8; convert the file to UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); a .json file must "
                        f"hold one list of records, each {expected}") from None
    for number, record in enumerate(records, start=1):
        yield f"{path}: record {number}", record


def chat_messages(record, where: str) -> list:
    """The messages of one chat record in any accepted format, as [{"role", "content"}, ...]."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not a chat record; each record must be "
                        f"an object {CHAT_RECORD}")
    if isinstance(record.get("messages"), list):                    # OpenAI
        return record["messages"]
    if isinstance(record.get("conversations"), list):               # minimind (role/content) or ShareGPT (from/value)
        turns = record["conversations"]
        is_sharegpt = any(isinstance(m, dict) and "from" in m for m in turns)
        return sharegpt_messages(turns, where) if is_sharegpt else turns
    if "instruction" in record and "output" in record:              # alpaca: one question, one answer
        prompt, extra = record["instruction"], record.get("input")
        if isinstance(prompt, str) and isinstance(extra, str) and extra:
            prompt += "\n" + extra
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    hint = '; {"text": ...} is pretraining data, for pretrain.py' if "text" in record else ""
    raise DataError(f"{where}: not a chat record (found keys: {', '.join(map(str, record)) or 'none'}{hint}); "
                    f"each record must be {CHAT_RECORD}")


def sharegpt_messages(turns: list, where: str) -> list:
    """ShareGPT turns {"from": "human" | "gpt" | "system", "value": ...} -> {"role", "content"} messages."""
    messages = []
    for i, turn in enumerate(turns):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in SHAREGPT_ROLES:
            raise DataError(f'{where}: message {i} has "from": {who!r}; ShareGPT turns come from '
                            f'{", ".join(SHAREGPT_ROLES)}')
        messages.append({"role": SHAREGPT_ROLES[who], "content": turn.get("value")})
    return messages


def read_conversations(path: str | Path) -> Iterator[dict]:
    """Yield {"conversations": [...], "family": ..., "lang": ...} from a .jsonl or .json file (and "answer",
    the final answer a checker compares, when a record has one: a worked answer's, data/cot.py).

    Accepts OpenAI "messages", minimind and ShareGPT "conversations", and alpaca records (see
    the top of this file). Bad records stop with file:line (or file: record N) and the fix.
    """
    for where, record in jsonl_records(path, CHAT_RECORD):
        messages = chat_messages(record, where)
        check_turns(messages, where)
        checked = {"answer": record["answer"]} if isinstance(record.get("answer"), str) else {}   # data/cot.py
        yield {"conversations": messages, "family": record.get("family", "user"), "lang": record.get("lang", ""),
               **checked}


def check_turns(messages: list, where: str) -> None:
    """An optional system message, then user/assistant turns in order, ending with the assistant.
    Tool results ({"role": "tool"}) answer an assistant message's "tool_calls": one or more of them
    stand where a user turn would (the template renders them inside one user turn)."""
    check_messages(messages, where)
    roles = [m["role"] for m in messages]
    body = messages[1:] if roles[0] == "system" else messages
    for i, message in enumerate(body):
        before = body[i - 1] if i else {}
        called = before.get("role") == "tool" or (before.get("role") == "assistant" and (
            before.get("tool_calls") or "<tool_call>" in (before.get("content") or "")))
        if message["role"] == "tool" and not called:
            raise DataError(f"{where}: a tool result (message {i + len(messages) - len(body)}) must follow an assistant "
                            f'message with "tool_calls" (or another tool result)')
    # consecutive tool results are one turn, in a user's place (the template renders them so)
    turns = [m["role"] for i, m in enumerate(body) if not (m["role"] == "tool" and i and body[i - 1]["role"] == "tool")]
    turns = ["user" if r == "tool" else r for r in turns]
    if not turns or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns)):
        raise DataError(f"{where}: roles out of order ({' -> '.join(roles)}); expected an optional system "
                        f"message, then user and assistant taking turns (tool results after a tool call)")
    if turns[-1] != "assistant":
        raise DataError(f"{where}: the conversation has no final assistant turn to learn from")


def encode_conversations(records: list[dict], tokenizer, block_size: int, where: str, verbose: bool = True):
    """Render every conversation to (x, y, answer_mask), 1-D tensors of one length; conversations
    longer than the context are skipped.

    y[t] is the token to predict after x[..t] (x shifted by one); answer_mask[t] is True where
    y[t] belongs to an assistant answer (its text and the <|im_end|> that closes it), as the
    chat template marks it. Which targets are learned is the stage's choice (full_sft.py).
    """
    examples, skipped = [], 0
    for record in records:
        ids, mask = render_chat(record["conversations"], tokenizer, where=where)
        if len(ids) > block_size + 1:
            skipped += 1
            continue
        examples.append((torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(mask[1:], dtype=torch.bool)))
    return check_examples(examples, skipped, block_size, where, verbose)


def check_examples(examples: list, skipped: int, block_size: int, where: str, verbose: bool = True) -> list:
    if skipped and verbose:
        print(f"{where}: skipped {skipped} conversations longer than the context of {block_size} tokens")
    if not examples:
        raise ValueError(f"{where}: no conversation fits the context of {block_size} tokens")
    return examples


def collate(examples, pad_id: int):
    """Examples (x, y) or (x, y, answer_mask) of different lengths -> tensors (B, T) padded on the
    right: x with pad_id, y with IGNORE_INDEX (padding is never learned), the mask with False."""
    T = max(len(example[0]) for example in examples)
    fill = (pad_id, IGNORE_INDEX, False)
    batch = [torch.full((len(examples), T), value, dtype=examples[0][i].dtype)
             for i, value in enumerate(fill[:len(examples[0])])]
    for row, example in enumerate(examples):
        for padded, tensor in zip(batch, example):
            padded[row, :len(tensor)] = tensor
    return tuple(batch)


def encode_seq2seq_conversations(records: list[dict], tokenizer, block_size: int, where: str, verbose: bool = True):
    """For an encoder-decoder model: each conversation -> (source ids, target ids).

    source = every message before the last answer, rendered with the chat template up to
    "<|im_start|>assistant\n" (what a decoder-only model would be prompted with); target =
    the answer's tokens and <|im_end|>. Conversations that do not fit are skipped.
    """
    examples, skipped = [], 0
    for record in records:
        messages = record["conversations"]
        source, _ = render_chat(messages[:-1], tokenizer, add_generation_prompt=True, where=where)
        target = tokenizer.encode_ordinary(messages[-1]["content"]) + [tokenizer.im_end_id]
        if len(source) > block_size or len(target) > block_size:
            skipped += 1
            continue
        examples.append((torch.tensor(source), torch.tensor(target)))
    return check_examples(examples, skipped, block_size, where, verbose)


def collate_seq2seq(examples, pad_id: int, start_id: int):
    """(source, target) pairs -> source (B, S) padded on the left, decoder input (B, T) =
    [start_id, target[:-1]], pad_lengths (B,), targets (B, T) padded on the right with -100,
    and the answer mask (B, T): every real target is part of the answer."""
    S = max(len(src) for src, _ in examples)
    T = max(len(tgt) for _, tgt in examples)
    source = torch.full((len(examples), S), pad_id, dtype=torch.long)
    decoder_input = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    pad_lengths = torch.tensor([S - len(src) for src, _ in examples])
    for row, (src, tgt) in enumerate(examples):
        source[row, S - len(src):] = src
        decoder_input[row, 0] = start_id
        decoder_input[row, 1:len(tgt)] = tgt[:-1]
        targets[row, :len(tgt)] = tgt
    return source, decoder_input, pad_lengths, targets, targets != IGNORE_INDEX


def chat_examples(records: list[dict], tokenizer, model_config, where: str, verbose: bool = True, max_len: int = 0):
    """Encode conversations the way the model reads them: one sequence for a decoder-only
    model (x, y, answer_mask), (source, target) for an encoder-decoder one. Conversations longer
    than the context, or than max_len tokens when that is shorter (a chat stage's --max_len: a model
    with a context of 8,192 tokens need not train on conversations that long), are skipped.
    verbose: say how many (under torchrun only the main process does)."""
    limit = sequence_limit(model_config, max_len)
    if model_config.n_encoder_layer:
        return encode_seq2seq_conversations(records, tokenizer, limit, where, verbose)
    return encode_conversations(records, tokenizer, limit, where, verbose)


def sequence_limit(model_config, max_len: int = 0) -> int:
    """The longest sequence a chat stage trains on: the model's context, or max_len if shorter (0 = no limit)."""
    return min(model_config.block_size, max_len) if max_len > 0 else model_config.block_size


def similar_length_rows(lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool: int = 8) -> list[int]:
    """batch_size random row indices of similar length, so that little of the batch is padding.

    Draw pool x batch_size rows at random, sort them by length, cut the sorted list into
    `pool` batches and keep one of them at random. Every row is still equally likely to be
    picked (each candidate lands in exactly one of the pool batches), but a batch of the
    default chat tasks is ~10% padding instead of ~55% (their lengths run from 20 to 140
    tokens), so each step costs about half as much. lengths: (N,) tokens per example.
    """
    candidates = torch.randint(len(lengths), (batch_size * pool,), generator=generator)
    candidates = candidates[torch.argsort(lengths[candidates], stable=True)]
    chosen = torch.randint(pool, (1,), generator=generator).item()
    return candidates[chosen * batch_size:(chosen + 1) * batch_size].tolist()


def chat_collate(model_config, tokenizer):
    """The batching function for the model kind: examples -> (the model's inputs..., targets, answer_mask)."""
    if model_config.n_encoder_layer:
        return lambda examples: collate_seq2seq(examples, tokenizer.eot_id, model_config.decoder_start_id)
    return lambda examples: collate(examples, tokenizer.eot_id)


WRONG_PERSONA = {"en": "I am a human, not a language model.", "zh": "我是一个人，不是语言模型。"}


def plausible_wrong_answer(record: dict, rng: random.Random, words: list[str], names: list[str]) -> str | None:
    """A wrong answer that looks like a right one (the 'rejected' side of a preference pair)."""
    messages, family = record["conversations"], record.get("family")
    right, prompt = messages[-1]["content"], messages[-2]["content"]
    lines = prompt.split("\n")[1:]                              # the words listed under the question
    if family == "repeat":
        word, n = right.split("\n")[0], right.count("\n") + 1
        wrong = "\n".join([word] * (n + rng.choice([-1, 1]))) if n > 2 else "\n".join([rng.choice(words)] * n)
    elif family in ("last", "first"):
        wrong = rng.choice([w for w in lines if w != right] or words)
    elif family == "recall":
        wrong = rng.choice([n for n in names if n != right])
    elif family == "identity":
        wrong = WRONG_PERSONA[record.get("lang") or "en"]
    elif family == "add":
        wrong = str(int(right) + rng.choice([-10, -2, -1, 1, 2, 10]))
    elif family == "upper":
        wrong = right.lower() if rng.random() < 0.5 else rng.choice(words).upper()
    elif family == "reverse":
        wrong = right[::-1]                                     # the word itself, not reversed
    elif family == "speaker":                                   # another speaker of the same passage
        others = sorted({line[:-1] for line in prompt.split("\n") if line.endswith(".") and line[:-1].isupper()} - {right})
        wrong = rng.choice(others) if others else None
    else:
        return None
    return wrong if wrong and wrong != right else None


def preference_pair(record: dict, rejected_answer: str) -> dict:
    """{"chosen": messages, "rejected": messages}: the same conversation, two different last answers."""
    prompt = record["conversations"][:-1]
    return {"chosen": record["conversations"],
            "rejected": prompt + [{"role": "assistant", "content": rejected_answer}],
            "family": record.get("family", "user"), "lang": record.get("lang", "")}


def read_preference_pairs(path: str | Path) -> Iterator[dict]:
    """Yield {"chosen": [...], "rejected": [...]} records from a .jsonl or .json file; bad records stop
    with file:line (or file: record N)."""
    for where, record in jsonl_records(path, PAIR_RECORD):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("chosen", "rejected")):
            raise DataError(f'{where}: needs "chosen" and "rejected" message lists')
        check_turns(record["chosen"], where + " (chosen)")
        check_turns(record["rejected"], where + " (rejected)")
        if record["chosen"][:-1] != record["rejected"][:-1]:
            raise DataError(f"{where}: chosen and rejected must share the conversation before their last answer "
                            f"(only the last assistant message may differ)")
        yield record


def records_and_held_out(read: Callable, data: str | Path, eval_data: str | Path = "",
                         announce: bool = True) -> tuple[list, list]:
    """(training records, held-out records) of --data and --eval_data, read with `read`
    (read_conversations or read_preference_pairs). Without eval_data every 20th record of data is
    held out, so a stage never picks its best weights by a loss on unrelated data."""
    records = list(read(data))
    if eval_data:
        return records, list(read(eval_data))
    if len(records) < 2:
        raise DataError(f"{data}: {len(records)} record(s): too few to hold some out; give --eval_data too")
    held_out = records[::HOLD_OUT_EVERY_NTH]
    if announce:
        print(f"data: no --eval_data: {len(held_out)} records of {data} (every {HOLD_OUT_EVERY_NTH}th) held out")
    return [r for i, r in enumerate(records) if i % HOLD_OUT_EVERY_NTH], held_out


def build_persona_data(out_dir: Path | None = None) -> tuple[Path, Path]:
    """The persona lesson (data/persona.py) as files, train.jsonl and eval.jsonl (the held-out phrasings)
    in out_dir (default DEFAULT_PERSONA_DIR); regenerated every time (it takes milliseconds), so they
    always match the code."""
    out_dir = Path(out_dir or DEFAULT_PERSONA_DIR)
    train, held_out = persona_data()
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, records in zip(paths, (train, held_out)):
        write_jsonl(path, records)
    return paths


def build_cot_chat_data(out_dir: Path | None = None) -> tuple[Path, Path]:
    """The default chat tasks with worked answers for add, reverse and upper (data/cot.py), in out_dir
    (default data/default/cot/): train.jsonl and eval.jsonl, the same prompts and held-out set."""
    build_default_chat_data(DEFAULT_CHAT_DIR, verbose=False)
    out_dir = Path(out_dir or DEFAULT_DIR / "cot")
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for source, path in zip(("sft_train.jsonl", "sft_eval.jsonl"), paths):
        write_jsonl(path, [with_trace(r) for r in read_conversations(DEFAULT_CHAT_DIR / source)])
    return paths


# --data NAME: a generated lesson, not a file
NAMED_DATA = {"persona": build_persona_data, "cot": build_cot_chat_data}


def stage_data(read: Callable, data: str, eval_data: str, default: Callable[[], tuple[Path, Path]],
               verbose: bool = True, tokenizer_file: str | Path = ""):
    """The data of a chat stage (SFT, LoRA, DPO): the user's --data (with --eval_data, or every 20th
    record held out), a named generated lesson (--data persona, with its own held-out file), else
    the stage's default files, default() -> (train path, held-out path).
    Returns (training records, held-out records, their files: the training one, and the held-out
    one or '' when it is held out of the training file). tokenizer_file: the file the records will be
    encoded with, printed so that a run says which tokenizer it used."""
    if eval_data and not data:
        raise ValueError("--eval_data needs --data (the training records) too")
    if tokenizer_file and verbose:
        print(f"tokenizer: {tokenizer_file}")
    if data in NAMED_DATA and not Path(data).exists():
        named_train, named_eval = NAMED_DATA[data]()
        train_path, eval_path = named_train, eval_data or named_eval
    else:
        train_path, eval_path = (data, eval_data) if data else default()
    train, held_out = records_and_held_out(read, train_path, eval_path, announce=verbose)
    return train, held_out, str(train_path), str(eval_path or "")


def sft_data_of(ckpt_config: dict) -> tuple[list, list, str]:
    """The conversations a model was fine-tuned on, as (training, held-out, where), read again from the
    files its config.json names (full_sft.py records them), else the default generated ones (none for
    an imported model): what lora.py replays and checks for forgetting, and what dpo.py measures task
    accuracy on."""
    if ckpt_config.get("stage") in ("gguf_import", "hf_import"):
        return [], [], ""            # an imported model (SmolLM2, Qwen2.5, ...) was fine-tuned on data we do not have
    data, eval_data = ckpt_config.get("data"), ckpt_config.get("eval_data")     # eval_data "": held out of data
    if ckpt_config.get("stage") != "sft" or not isinstance(data, str) or not isinstance(eval_data, str) \
            or not Path(data).exists() or (eval_data and not Path(eval_data).exists()):
        data, eval_data = DEFAULT_CHAT_DIR / "sft_train.jsonl", DEFAULT_CHAT_DIR / "sft_eval.jsonl"
        if not data.exists():
            return [], [], str(DEFAULT_CHAT_DIR)
    train, held_out = records_and_held_out(read_conversations, data, eval_data, announce=False)
    return train, held_out, str(data)
