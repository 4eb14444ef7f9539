"""
The persona lesson: teach a pretrained chat model who it is, and check that it still knows
what it knew. Generated at run time from the templates below (`--data persona` in
full_sft.py, lora.py and dpo.py).

Three kinds of question a model is asked about itself, each with one answer to learn:

    who     "Hey, who are you?"        -> "I am Workshop, a small language model fine-tuned in the LLM workshop."
    name    "What should I call you?"  -> "My name is Workshop."
    maker   "Who trained you? Thanks." -> "I was fine-tuned in the LLM workshop, where a chat model is built
                                           step by step."

A question is an opening ("Hey, "), a core question ("who are you?") and a closing
(" Thanks."). The held-out questions use other cores, openings and closings than the
training ones: no held-out question, and no core of one, is ever trained on, so a right
answer is generalisation to a new phrasing, not recall of a seen one. They are scored by
exact match (scoring.py), per question kind.

A model that learns only these three answers soon gives them to every question ("The capital
of the LLM workshop is Workshop."): the lesson also has GENERAL questions, which the model
answers itself before training (`own_answer_records`), learned beside the persona so that
it keeps answering other questions as before.

What it knew: KNOWLEDGE, general questions with short checkable answers ("What is the
capital of France?" -> contains "Paris"). A pretrained model answers in sentences ("The
capital of France is Paris."), so an answer counts when it contains an accepted answer as
a word (`knows`). They are never trained on: asked before and after fine-tuning, they show
what the lesson cost (forgetting), item by item.
"""

from __future__ import annotations

import random
import re
from typing import Callable

PERSONA_ANSWERS = {
    "who": "I am Workshop, a small language model fine-tuned in the LLM workshop.",
    "name": "My name is Workshop.",
    "maker": "I was fine-tuned in the LLM workshop, where a chat model is built step by step.",
}
KINDS = tuple(PERSONA_ANSWERS)

# core questions: the training ones and the held-out ones never overlap
CORES = {
    "who": {"train": ["who are you?", "what are you?", "tell me about yourself.", "introduce yourself.",
                      "describe yourself.", "what kind of assistant are you?", "can you tell me who you are?",
                      "what am I talking to?", "are you a person or a program?",
                      "give me a short introduction of yourself."],
            "eval": ["who am I chatting with?", "what sort of AI are you?",
                     "could you say a few words about yourself?", "who is on the other side of this chat?",
                     "what exactly are you?"]},
    "name": {"train": ["what is your name?", "what's your name?", "what should I call you?", "do you have a name?",
                       "tell me your name.", "how should I address you?", "what are you called?"],
             "eval": ["what name do you go by?", "may I know your name?", "by what name are you known?",
                      "say your name."]},
    "maker": {"train": ["who made you?", "who created you?", "who built you?", "where do you come from?",
                        "who trained you?", "who is your creator?", "how were you made?"],
              "eval": ["who developed you?", "which team is behind you?", "where were you trained?",
                       "who is responsible for building you?"]},
}
OPENINGS = {"train": ["", "Hi! ", "Hello. ", "Hey, ", "Quick question: "],
            "eval": ["", "Good morning! ", "Excuse me, ", "Hi there, "]}
CLOSINGS = {"train": ["", " Thanks.", " Be brief."],
            "eval": ["", " I'm curious.", " Please answer."]}

# what the model knew before: (question, answers that count, found as a word in the reply)
KNOWLEDGE = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many continents are there?", ["7", "seven"]),
    ("What is 7 + 5?", ["12", "twelve"]),
    ("What is 3 times 4?", ["12", "twelve"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical formula of water?", ["H2O", "H₂O"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("What is the opposite of hot?", ["cold"]),
    ("On which planet do we live?", ["Earth"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What do bees make?", ["honey"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
]


# other questions, answered by the model itself before training and learned beside the lesson, so that
# it keeps answering them as before instead of saying who it is to every question (none is in KNOWLEDGE)
GENERAL = {
    "Name a {}.": ["fruit", "vegetable", "colour", "musical instrument", "sport", "flower", "bird", "tree",
                   "board game", "kitchen tool", "sea animal", "winter sport", "type of cloud", "dog breed"],
    "What is a {}?": ["volcano", "rainbow", "library", "bicycle", "telescope", "bridge", "compass", "thermometer",
                      "calendar", "lighthouse", "glacier", "microscope", "harbour", "desert"],
    "Give me a word that means {}.": ["happy", "big", "fast", "smart", "quiet", "tired", "angry", "small"],
    "Write one sentence about {}.": ["winter", "the sea", "friendship", "a cat", "music", "rain", "a garden",
                                     "the moon", "trains", "breakfast"],
    "What is the plural of {}?": ["mouse", "child", "box", "leaf", "tooth", "city", "knife", "goose"],
    "Give me a tip for {}.": ["sleeping better", "learning a language", "saving money", "studying", "running",
                              "cooking rice", "staying focused", "writing an email"],
}
SUMS = 40                             # and as many "What is 37 + 44?" (two numbers from 11 to 49)
OWN_ANSWER_TOKENS = 64                # the longest own answer generated (longer ones are left out)


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """n different questions from the GENERAL templates, in a fixed order for a given seed."""
    rng = random.Random(seed)
    prompts = [t.format(word) for t, words in GENERAL.items() for word in words]
    pairs = [(a, b) for a in range(11, 50) for b in range(11, 50)]
    prompts += [f"What is {a} + {b}?" for a, b in rng.sample(pairs, SUMS)]
    return rng.sample(prompts, min(n, len(prompts)))


def own_answer_records(answer: Callable[[list[list[dict]], int], list[str]], tokenizer, n: int,
                       seed: int = 0) -> list[dict]:
    """n general questions with the model's own answers; answer(conversations, max_new_tokens) -> its
    replies (a stage passes scoring.greedy_answers with its model). Training on them beside the lesson
    keeps those answers where they were. Replies cut off at OWN_ANSWER_TOKENS are left out: learning
    them, with the end of answer after them, would teach the model to stop mid-sentence."""
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
                     for q in general_prompts(n, seed)]
    records = []
    for c, reply in zip(conversations, answer(conversations, OWN_ANSWER_TOKENS)):
        if reply.strip() and len(tokenizer.encode_ordinary(reply)) < OWN_ANSWER_TOKENS:
            records.append({"conversations": [c[0], {"role": "assistant", "content": reply.strip()}],
                            "family": "own", "lang": "en"})
    return records


def question(opening: str, core: str, closing: str) -> str:
    """'Hey, ' + 'who are you?' + ' Thanks.'; a core opens the sentence with a capital letter unless it
    follows an opening that ends with a comma or a colon."""
    if not opening or opening.rstrip()[-1] in ".!?":
        core = core[0].upper() + core[1:]
    return opening + core + closing


def persona_records(split: str) -> list[dict]:
    """Every question of a split ("train" or "eval") with its answer, as chat records
    {"conversations": [user, assistant], "family": kind, "lang": "en"}."""
    records = []
    for kind in KINDS:
        for core in CORES[kind][split]:
            for opening in OPENINGS[split]:
                for closing in CLOSINGS[split]:
                    records.append({"conversations": [
                        {"role": "user", "content": question(opening, core, closing)},
                        {"role": "assistant", "content": PERSONA_ANSWERS[kind]}], "family": kind, "lang": "en"})
    return records


def persona_data(n_eval_per_kind: int = 12, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): every training question once, in a shuffled order,
    and n_eval_per_kind held-out questions of each kind (a fixed sample for a given seed)."""
    rng = random.Random(seed)
    train = persona_records("train")
    rng.shuffle(train)
    held_out = []
    for kind in KINDS:
        of_kind = [r for r in persona_records("eval") if r["family"] == kind]
        held_out += rng.sample(of_kind, min(n_eval_per_kind, len(of_kind)))
    return train, held_out


def knowledge_records() -> list[dict]:
    """KNOWLEDGE as chat records; the first accepted answer is the expected one, "accept" lists all."""
    return [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": accept[0]}],
             "family": "knowledge", "lang": "en", "accept": accept} for q, accept in KNOWLEDGE]


def knows(answer: str, accepted: list[str]) -> bool:
    """True if the answer contains one of the accepted answers as a whole word, ignoring case
    ("The capital of France is Paris." knows "Paris"; "17 days" does not know "7")."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


def knowledge_report(records: list[dict], answers: list[str]) -> dict:
    """{"accuracy", "known": [True/False per question], "n", "examples"} for the model's answers to
    knowledge_records()."""
    known = [knows(a, r["accept"]) for r, a in zip(records, answers)]
    examples = [{"prompt": r["conversations"][-2]["content"], "expected": " / ".join(r["accept"]),
                 "answer": a, "correct": k} for r, a, k in zip(records, answers, known)]
    return {"accuracy": sum(known) / max(1, len(known)), "known": known, "n": len(known), "examples": examples}


def knowledge_check(answer: Callable[[list[list[dict]], int], list[str]], label: str,
                    max_new_tokens: int = 32) -> dict:
    """Ask the KNOWLEDGE questions; answer(conversations, max_new_tokens) -> the model's replies (a stage
    passes scoring.greedy_answers with its model). Prints '{label}: knows 14 of 24 general questions (58.3%)'."""
    records = knowledge_records()
    report = knowledge_report(records, answer([r["conversations"] for r in records], max_new_tokens))
    print(f"{label}: knows {sum(report['known'])} of {report['n']} general questions ({report['accuracy']:.1%})")
    return report


def knowledge_metrics(before: dict, after: dict) -> dict:
    """The metrics.json keys of the knowledge check: accuracy before and after, and which questions
    the fine-tuned model forgot (right before, wrong after) or newly got right."""
    prompts = [e["prompt"] for e in after["examples"]]
    changed = list(zip(prompts, before["known"], after["known"]))
    return {"knowledge_accuracy": after["accuracy"], "knowledge_accuracy_before": before["accuracy"],
            "knowledge_forgotten": [p for p, was, now in changed if was and not now],
            "knowledge_gained": [p for p, was, now in changed if now and not was],
            "knowledge_answers": {e["prompt"]: e["answer"] for e in after["examples"]}}


def knowledge_line(before: dict, after: dict) -> str:
    """'knowledge 14/24 -> 13/24 (forgot 1)': for a stage's last line."""
    forgot = sum(1 for was, now in zip(before["known"], after["known"]) if was and not now)
    return f"knowledge {sum(before['known'])}/{before['n']} -> {sum(after['known'])}/{after['n']} (forgot {forgot})"
