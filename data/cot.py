"""
Chain of thought for the chat tasks that need computation: the answer is worked out in small
steps the model can copy, and the final answer is marked so a checker can read it.

    add      "Add 67 and 89."      ->  "ones: 7+9=16, 6 carry 1\\ntens: 6+8+1=15, 5 carry 1\\nAnswer: 156"
    reverse  "Reverse the letters:\\nflood"  ->  "f l o o d\\nd o o l f\\nAnswer: doolf"
    upper    "Uppercase:\\nbring"  ->  "b r i n g\\nB R I N G\\nAnswer: BRING"

Why it helps a small model: its tokenizer sees "flood" as one or two tokens, so reversing it
in one step means knowing the letters of every token by heart; spelled out with spaces, each
letter is its own token and every step is a copy. Addition becomes one digit at a time with a
carry, the way it is taught at school, instead of recalling 10,000 sums.

`python full_sft.py --data cot` trains on these (data/default/cot/): the same prompts and the
same held-out set as the default chat tasks, with the traces in the answers of these families
(the others unchanged). Each record keeps its final answer as "answer", and scoring.py compares
the text after the model's last "Answer:" (or "答案：") with it, so accuracy per family compares
directly with SFT on direct answers.
"""

from __future__ import annotations

import json

COT_FAMILIES = ("add", "reverse", "upper")
MARKERS = {"en": "Answer: ", "zh": "答案："}


def addition_trace(a: int, b: int) -> list[str]:
    """One line per digit, ones first: 'ones: 7+9=16, 6 carry 1'."""
    places = ["ones", "tens", "hundreds", "thousands"]
    lines, carry = [], 0
    x, y = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(x), len(y))):
        da, db = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        total = da + db + carry
        term = f"{da}+{db}" + (f"+{carry}" if carry else "")
        carry = total // 10
        place = places[i] if i < len(places) else f"10^{i}"       # (the chat tasks stay below 10,000)
        lines.append(f"{place}: {term}={total}, {total % 10} carry {carry}")
    return lines


def trace(family: str, prompt: str, answer: str, lang: str = "en") -> str:
    """The worked answer of one conversation, ending with the marked final answer."""
    if family == "add":
        a, b = (int(t) for t in "".join(c if c.isdigit() else " " for c in prompt).split()[:2])
        steps = addition_trace(a, b)
    elif family in ("reverse", "upper"):
        word = prompt.split("\n")[-1].strip()
        steps = [" ".join(word), " ".join(answer)]
    else:
        raise ValueError(f"no chain of thought for the {family!r} family; families with one: {COT_FAMILIES}")
    return "\n".join(steps + [MARKERS.get(lang, MARKERS["en"]) + answer])


def with_trace(record: dict) -> dict:
    """A chat record with its last answer worked out (families in COT_FAMILIES) and "answer" kept;
    other records unchanged, with "answer" too."""
    messages = record["conversations"]
    answer = messages[-1]["content"]
    if record.get("family") not in COT_FAMILIES:
        return {**record, "answer": answer}
    worked = trace(record["family"], messages[-2]["content"], answer, record.get("lang", "en"))
    return {**record, "conversations": messages[:-1] + [{"role": "assistant", "content": worked}], "answer": answer}


def marked_answer(text: str) -> str:
    """The text after the last answer marker ("Answer:" or "答案："), or the whole text if there is none."""
    cut = max((text.rfind(m.strip()), m.strip()) for m in MARKERS.values())
    return text[cut[0] + len(cut[1]):].strip() if cut[0] >= 0 else text.strip()


if __name__ == "__main__":        # show a few worked answers
    for family, prompt, answer in (("add", "Add 67 and 89.", "156"), ("reverse", "Reverse:\nflood", "doolf"),
                                   ("upper", "Uppercase:\nbring", "BRING")):
        print(json.dumps(trace(family, prompt, answer), ensure_ascii=False))
