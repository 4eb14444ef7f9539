"""
Tasks grounded in the pretraining corpus: the plays' speakers and lines, the poems' verses.

Two kinds, both built from the default corpus files (data/default/*.txt), held-out items
only from the validation text (never seen in pretraining or fine-tuning):

1. The chat family "speaker" (exact match, used by full_sft.py with the other families):

       Read this passage:                          -> "PAROLLES"
       BERTRAM.
       And I will do so.
       PAROLLES.
       Worthy fellows; and like to prove most sinewy sword-men.

       Who says "Worthy fellows; and like to prove most sinewy sword-men."?

2. Multiple-choice items, scored by comparing the log-likelihood of each option as a
   continuation of the context (how HellaSwag / ARC are scored for base models):

       next_line     a passage of a play -> which of 4 lines comes next
       next_speaker  a passage of a play, up to a new speech -> which of 4 speakers of the play speaks
       next_verse    a Tang/Song poem's title, author and first verses -> which of 4 verses comes next

   Record format: {"context": str, "options": [str, ...], "answer": index, "family": str}.
   A chat-format item has "messages" (the conversation before the answer) instead of "context".
"""

from __future__ import annotations

import random
import re
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "default"        # the default corpus, built by `python pretrain.py`
DEFAULT_CHOICE_PATH = DEFAULT_DIR / "choice_eval.jsonl"          # the default multiple-choice set
SPEAKER_LINE = re.compile(r"^([A-Z][A-Z'\- ]{1,30}[A-Z])\.$")   # "FIRST LORD." starts a speech
SPEAKER_TEMPLATES = {"en": ('Read this passage:\n{passage}\n\nWho says "{line}"?',
                            'Who speaks the line "{line}" in this passage?\n{passage}'),
                     "zh": ("阅读这段对白：\n{passage}\n\n谁说了“{line}”？",
                            "下面这段对白里，“{line}”是谁说的？\n{passage}")}
MAX_LINE_CHARS = 70        # keep passages short enough for a 256-token context


def speeches(text: str) -> list[list[tuple[str, str]]]:
    """Scenes of a play text as runs of consecutive speeches [(speaker, first line), ...].

    A speech is a paragraph whose first line is a speaker ("HAMLET.") followed by its
    lines; anything else (stage directions, headings) ends the current run.
    """
    runs, current = [], []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().split("\n") if line.strip()]
        match = SPEAKER_LINE.match(lines[0]) if lines else None
        if match and len(lines) > 1 and not lines[1].startswith("["):
            current.append((match.group(1), lines[1]))
        else:
            if len(current) > 1:
                runs.append(current)
            current = []
    if len(current) > 1:
        runs.append(current)
    return runs


def speaker_records(text: str, n: int, rng: random.Random, zh_share: float = 0.3) -> list[dict]:
    """n "who says this line?" conversations from passages of 2-3 consecutive speeches."""
    candidates = []
    for run in speeches(text):
        for start in range(len(run) - 1):
            window = run[start:start + rng.choice((2, 3))]
            lines = [line for _, line in window]
            # a line that appears twice in the passage, or a one-speaker passage, has no single answer
            if len(set(lines)) == len(lines) and len({s for s, _ in window}) > 1 \
                    and all(len(line) <= MAX_LINE_CHARS for line in lines):
                candidates.append(window)
    if not candidates:
        raise ValueError("no play passages with speakers found: is this the Shakespeare corpus?")
    records = []
    for _ in range(n):
        window = rng.choice(candidates)
        speaker, line = rng.choice(window)
        lang = "zh" if rng.random() < zh_share else "en"
        passage = "\n".join(f"{s}.\n{text_line}" for s, text_line in window)
        prompt = rng.choice(SPEAKER_TEMPLATES[lang]).format(passage=passage, line=line)
        records.append({"conversations": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": speaker}],
                        "family": "speaker", "lang": lang})
    return records


def _distractors(right: str, pool: list[str], rng: random.Random, k: int = 3) -> list[str]:
    """k different wrong options drawn from pool (never equal to the right one)."""
    choices = set()
    while len(choices) < k:
        option = rng.choice(pool)
        if option != right:
            choices.add(option)
    return sorted(choices)


def _item(context: str, right: str, wrong: list[str], family: str, rng: random.Random) -> dict:
    options = wrong + [right]
    rng.shuffle(options)
    return {"context": context, "options": options, "answer": options.index(right), "family": family}


def play_choice_items(text: str, n: int, rng: random.Random, context_lines: int = 8) -> list[dict]:
    """next_line and next_speaker items from play text (n of each)."""
    lines = text.split("\n")
    speech_starts = [i for i, line in enumerate(lines) if SPEAKER_LINE.match(line) and i >= context_lines]
    verse_lines = [i for i in range(context_lines, len(lines) - 1)
                   if 20 <= len(lines[i]) <= MAX_LINE_CHARS and not lines[i].startswith(" ")
                   and not SPEAKER_LINE.match(lines[i])
                   and lines[i - 1].strip() and not lines[i - 1].startswith("[") and not lines[i].startswith("[")]
    all_verses = [lines[i] for i in verse_lines]
    items = []
    for i in rng.sample(verse_lines, min(n, len(verse_lines))):
        context = "\n".join(lines[i - context_lines:i]) + "\n"
        items.append(_item(context, lines[i], _distractors(lines[i], all_verses, rng), "next_line", rng))
    for i in rng.sample(speech_starts, min(n, len(speech_starts))):
        right = SPEAKER_LINE.match(lines[i]).group(1)
        # the other speakers nearby belong to the same play: plausible, not trivially wrong
        nearby = {m.group(1) for line in lines[max(0, i - 300):i + 300] if (m := SPEAKER_LINE.match(line))}
        if len(nearby - {right}) < 3:
            continue
        context = "\n".join(lines[i - context_lines:i]) + "\n"
        wrong = _distractors(right, sorted(nearby), rng)
        items.append(_item(context, right + ".", [w + "." for w in wrong], "next_speaker", rng))
    return items


def poem_choice_items(text: str, n: int, rng: random.Random) -> list[dict]:
    """next_verse items: a poem's title, author and first verses -> which verse comes next."""
    poems = [p.strip().split("\n") for p in re.split(r"\n\s*\n", text) if p.strip().startswith("《")]
    poems = [p for p in poems if len(p) >= 4 and p[1].startswith("作者")]
    verses_by_length: dict[int, list[str]] = {}
    for poem in poems:
        for verse in poem[2:]:
            verses_by_length.setdefault(len(verse), []).append(verse)
    candidates = [(poem, k) for poem in poems for k in range(3, len(poem))
                  if len(set(verses_by_length[len(poem[k])])) > 3]
    items = []
    for poem, k in rng.sample(candidates, min(n, len(candidates))):
        right = poem[k]
        wrong = _distractors(right, verses_by_length[len(right)], rng)   # same length: no length give-away
        items.append(_item("\n".join(poem[:k]) + "\n", right, wrong, "next_verse", rng))
    return items


def build_choice_items(corpus_dir: Path = DEFAULT_DIR, n_per_family: int = 100, seed: int = 0) -> list[dict]:
    """The default multiple-choice set, from the validation text only."""
    english = corpus_dir / "en_val.txt"
    if not english.exists():
        raise FileNotFoundError(f"{english} not found: run `python pretrain.py` first (it builds the corpus)")
    rng = random.Random(seed)
    items = play_choice_items((corpus_dir / "en_val.txt").read_text(encoding="utf-8"), n_per_family, rng)
    zh_val = corpus_dir / "zh_val.txt"
    if zh_val.exists():
        items += poem_choice_items(zh_val.read_text(encoding="utf-8"), n_per_family, rng)
    return items
