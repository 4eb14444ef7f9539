"""Chain of thought (data/cot.py): the traces compute the right answer, keep the prompts and the
held-out set, and the checker reads the marked final answer."""
import re

import pytest

from data import chat_data
from data.cot import COT_FAMILIES, addition_trace, marked_answer, trace, with_trace
from scoring import is_right


def sum_from_trace(lines: list[str]) -> int:
    """Read an addition trace back as a person would: the written digits, ones first, then the last carry."""
    digits, carry = [], 0
    for line in lines:
        written, carry = re.search(r", (\d) carry (\d)$", line).groups()
        digits.append(written)
        carry = int(carry)
    return int((str(carry) if carry else "") + "".join(reversed(digits)))


@pytest.mark.parametrize("a", range(0, 100, 7))
def test_every_addition_trace_adds_up(a):
    for b in range(100):
        lines = addition_trace(a, b)
        assert sum_from_trace(lines) == a + b, lines
        for line in lines:                       # each line's own arithmetic is right
            terms, total = re.search(r": ([\d+]+)=(\d+),", line).groups()
            assert sum(int(t) for t in terms.split("+")) == int(total)


def test_traces_spell_the_word_and_end_with_the_marked_answer():
    assert trace("reverse", "Reverse the letters:\nflood", "doolf") == "f l o o d\nd o o l f\nAnswer: doolf"
    assert trace("upper", "大写：\nbring", "BRING", "zh") == "b r i n g\nB R I N G\n答案：BRING"
    assert marked_answer(trace("add", "计算 67 + 89。", "156", "zh")) == "156"
    with pytest.raises(ValueError, match="no chain of thought for the 'recall' family"):
        trace("recall", "What is my name?", "Rimo")


def test_the_checker_reads_the_text_after_the_last_marker_when_the_record_has_an_answer():
    record = {"conversations": [{"role": "user", "content": "Uppercase:\nbring"},
                                {"role": "assistant", "content": "b r i n g\nB R I N G\nAnswer: BRING"}],
              "answer": "BRING"}
    assert is_right("b r i n g\nB R I N G\nAnswer: BRING", record)
    assert is_right("wrong steps\nAnswer: BRING ", record)        # the final answer is what is checked
    assert is_right("BRING", record)                                # no marker: the whole answer is the final one
    assert not is_right("Answer: BRING\nAnswer: BRINK", record)  # the last marker counts
    plain = {"conversations": record["conversations"][:1] + [{"role": "assistant", "content": "BRING"}]}
    assert is_right(" BRING ", plain) and not is_right("Answer: BRING", plain)   # no "answer": exact match


def test_cot_data_has_the_same_prompts_and_held_out_set_with_worked_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_data, "DEFAULT_CHAT_DIR", tmp_path / "chat")
    from conftest import write_chat_data
    (tmp_path / "chat").mkdir()
    write_chat_data(tmp_path / "chat")
    for name in ("train", "eval"):
        (tmp_path / "chat" / f"{name}.jsonl").rename(tmp_path / "chat" / f"sft_{name}.jsonl")
    train_path, eval_path = chat_data.build_cot_chat_data(tmp_path / "cot")
    for plain_name, path in (("sft_train.jsonl", train_path), ("sft_eval.jsonl", eval_path)):
        plain = list(chat_data.read_conversations(tmp_path / "chat" / plain_name))
        worked = list(chat_data.read_conversations(path))
        assert [r["conversations"][:-1] for r in plain] == [r["conversations"][:-1] for r in worked]
        for p, w in zip(plain, worked):
            assert w["answer"] == p["conversations"][-1]["content"]             # the final answer, kept
            assert is_right(w["conversations"][-1]["content"], w)              # the trace ends with it
            changed = w["conversations"][-1]["content"] != p["conversations"][-1]["content"]
            assert changed == (p["family"] in COT_FAMILIES)
    assert with_trace(plain[0])["answer"] == plain[0]["conversations"][-1]["content"]
