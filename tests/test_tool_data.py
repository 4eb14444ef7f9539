"""data/tool_data.py: calculator-use chat data that full_sft.py can read, with held-out numbers."""
import json

import pytest

from data.chat_data import read_conversations
from data.tool_data import CALCULATOR, generate_tool_data, is_held_out_number, read_addition_questions, write_tool_data
from tokenizer import Tokenizer
from tokenizer.chat import parse_tool_calls, render_chat
from tools import calculate, calculator_tool, format_number


def test_the_data_offers_the_calculator_exactly_as_tools_py_does():
    assert CALCULATOR == calculator_tool().schema()


def test_the_files_are_chat_data_full_sft_reads_and_the_calls_compute_the_answer(tmp_path):
    paths = write_tool_data(tmp_path, n_train=40, n_eval=10)
    train = list(read_conversations(paths["train_tools"]))             # full_sft.py's own reader accepts it
    assert len(train) == 40 and len(list(read_conversations(paths["eval_direct"]))) == 10
    for record in train:
        messages = record["conversations"]
        _, [call] = parse_tool_calls(messages[2]["content"])
        result = format_number(calculate(call.arguments["expression"]))
        assert messages[3]["content"] == f"<tool_response>\n{result}\n</tool_response>"
        assert messages[4]["content"].endswith(f"= {result}.")


def test_held_out_numbers_never_appear_in_training():
    data = generate_tool_data(n_train=300, n_eval=50, seed=1)
    numbers = lambda records: {int(n) for r in records for n in json.loads(r["conversations"][2]["content"]
                                                                         .split("\n")[1])["arguments"]["expression"].split(" + ")}
    assert not any(is_held_out_number(n) for n in numbers(data["train_tools"]))
    assert all(is_held_out_number(n) for n in numbers(data["eval_tools"]))
    assert [r["expected"] for r in data["eval_tools"]] == [r["expected"] for r in data["eval_direct"]]


def test_the_mask_teaches_the_call_and_the_answer_not_the_result():
    record = generate_tool_data(n_train=1, n_eval=0, schema=False)["train_tools"][0]
    tok = Tokenizer.from_texts([json.dumps(record, ensure_ascii=False) * 5], vocab_size=300, progress=False)
    ids, mask = render_chat(record["conversations"], tok)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    messages = record["conversations"]
    assert learned == messages[1]["content"] + "<|im_end|>" + messages[3]["content"] + "<|im_end|>"
    assert messages[0]["role"] == "user"                                # --no_schema: no system prompt


def test_eval_questions_are_read_back_with_their_sums(tmp_path):
    paths = write_tool_data(tmp_path, n_train=2, n_eval=3)
    items = read_addition_questions(paths["eval_tools"])
    assert len(items) == 3 and [m["role"] for m in items[0][0]] == ["system", "user"] and items[0][1].isdigit()
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n', encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_addition_questions(tmp_path / "bad.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl'}:1: not an addition record")


def test_openai_style_tool_messages_are_read_and_render_as_the_text_form(tmp_path):
    """Training data with structured calls ({"role": "assistant", "tool_calls": [...]}, then {"role": "tool"}),
    as OpenAI's fine-tuning format writes them: read by full_sft.py's reader, same tokens as the text form."""
    from data.pretrain_data import DataError
    text_form = generate_tool_data(n_train=1, n_eval=0, schema=False)["train_tools"][0]["conversations"]
    user, call_text, result_text, answer = text_form
    _, [call] = parse_tool_calls(call_text["content"])
    result = result_text["content"].split("\n")[1]
    structured = [user, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": result}, answer]
    path = tmp_path / "openai.jsonl"
    path.write_text(json.dumps({"messages": structured}) + "\n" + json.dumps({"messages": [user, structured[2], answer]})
                    + "\n", encoding="utf-8")
    reader = read_conversations(path)
    [record] = [next(reader)]
    tok = Tokenizer.from_texts([json.dumps(text_form, ensure_ascii=False) * 5], vocab_size=300, progress=False)
    assert render_chat(record["conversations"], tok) == render_chat(text_form, tok)
    with pytest.raises(DataError) as e:                       # a result nobody asked for: one line, file and line
        next(reader)
    assert str(e.value).startswith(f"{path}:2: a tool result (message 1) must follow an assistant message")
