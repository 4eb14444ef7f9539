"""Tool calls: the chat format (tokenizer/chat.py), the calculator and toolbox (tools.py), the agent loop (agent.py)."""
import json

import pytest
import torch

from agent import engine_answerer, run_agent
from engine import Engine, SamplingParams
from model import GPT, ModelConfig
from tokenizer import Tokenizer
from tokenizer.chat import ToolCall, chat_text, parse_tool_calls, render_chat
from tools import CalculatorError, Toolbox, builtin_toolbox, calculate, calculator_tool, format_number

TEXT = 'What is 2+3? <tool_call> {"name": "calculator", "arguments": {"expression": "2+3"}} </tool_call> 5\n' * 30
CALL = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
CONVERSATION = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_0", "content": "5"},
                {"role": "assistant", "content": "2+3 = 5."}]
SCHEMAS = [calculator_tool().schema()]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_texts([TEXT], vocab_size=300, progress=False)


# ---- the chat format -------------------------------------------------------------------------------------------

def test_a_tool_call_and_its_result_render_as_qwen_does():
    text = chat_text(CONVERSATION, tools=SCHEMAS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(SCHEMAS[0]) in text                   # the schema, one JSON object per line inside <tools>
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n'
            '</tool_call><|im_end|>\n') in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n" in text


def test_results_in_a_row_share_one_user_turn_and_text_before_a_call_comes_first():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, CALL]},
                {"role": "tool", "content": "5"}, {"role": "tool", "content": "6"}]
    text = chat_text(messages)
    assert "<|im_start|>assistant\nLet me check.\n<tool_call>\n" in text
    assert ("<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n6\n</tool_response><|im_end|>"
            in text) and text.count("<|im_start|>user") == 2


def test_the_mask_learns_the_call_and_the_answer_but_not_the_tool_result(tok):
    ids, mask = render_chat(CONVERSATION, tok, tools=SCHEMAS)
    learned = [i for i, m in zip(ids, mask) if m]
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    assert learned == tok.encode(call) + [tok.im_end_id] + tok.encode("2+3 = 5.") + [tok.im_end_id]
    assert tok.decode(ids) == chat_text(CONVERSATION, tools=SCHEMAS)


def test_calls_written_out_as_text_render_to_the_same_tokens(tok):
    """data/tool_data.py writes calls and results as plain text (any chat jsonl reader takes it): same ids and mask."""
    inline = [{"role": "user", "content": "What is 2+3?"},
              {"role": "assistant", "content": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}'
                                               '\n</tool_call>'},
              {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
              {"role": "assistant", "content": "2+3 = 5."}]
    assert render_chat(inline, tok, tools=SCHEMAS) == render_chat(CONVERSATION, tok, tools=SCHEMAS)


@pytest.mark.parametrize("message,error", [
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "in an assistant message"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}, "tool call 0"),
    ({"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "{oops"}]}, "not valid JSON"),
    ({"role": "assistant", "content": None}, "has no text"),
])
def test_malformed_tool_messages_are_one_clear_line(tok, message, error):
    with pytest.raises(ValueError) as e:
        render_chat([{"role": "user", "content": "hi"}, message], tok, where="data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: message 1") and error in str(e.value)


def test_parse_tool_calls_finds_calls_text_and_broken_blocks():
    text = ('I will compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}\n</tool_call>'
            '<tool_call>\n{"name": oops}\n</tool_call><tool_call>\n{"name": "cut", "argu')
    content, calls = parse_tool_calls(text)
    assert content == "I will compute."
    assert [(c.name, c.arguments) for c in calls[:2]] == [("calculator", {"expression": "1+1"}), ("search", {"query": "x"})]
    assert "not valid JSON" in calls[2].error and "not valid JSON" in calls[3].error      # an unfinished block too
    assert parse_tool_calls("just an answer") == ("just an answer", [])
    _, listed = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]</tool_call>')
    assert [(c.name, c.arguments, c.id) for c in listed] == [("a", {}, "call_0"), ("b", {"x": 1}, "call_1")]


# ---- the calculator and the toolbox -------------------------------------------------------------------------------

@pytest.mark.parametrize("expression,value", [
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("-2**2", "-4"), ("2**3**2", "512"), ("2^10", "1024"),
    ("10/4", "2.5"), ("10/2", "5"), ("7//2", "3"), ("7 % 3", "1"), ("0.1+0.2", "0.3"),
    ("123456789*987654321", "121932631112635269"), ("sqrt(16)+abs(-2)", "6"), ("max(3, 9, 4)", "9"),
    ("3 × 4 ÷ 2", "6"), ("1e3 + .5", "1000.5"), ("pi", "3.14159265359"),
])
def test_calculator_computes(expression, value):
    assert format_number(calculate(expression)) == value


@pytest.mark.parametrize("expression,error", [
    ("__import__('os').system('ls')", "unexpected \"'\" at position 11"), ("__import__", "unknown name"), ("2 +", "ends too early"), ("(1+2", "ends too early"),
    ("1/0", "division by zero"), ("9**9**9", "more than 1000 digits"), ("x + 1", "unknown name 'x'"),
    ("1 2", "unexpected '2'"), ("", "empty"), ("sqrt(1, 2)", "one argument"), ("sqrt(-1)", "sqrt(-1)"),
    ("open('f')", "unexpected \"'\""),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, error):
    with pytest.raises(CalculatorError) as e:
        calculate(expression)
    assert error in str(e.value)


def test_toolbox_answers_every_call_with_text_errors_included():
    box = builtin_toolbox(["calculator"])
    assert box.call(ToolCall("calculator", {"expression": "6*7"})) == "42"
    assert box.call(ToolCall("calculator", {"expression": "6*"})).startswith("error: the expression ends too early")
    assert box.call(ToolCall("weather", {})).startswith("error: there is no tool 'weather'; the tools are calculator")
    assert "missing expression" in box.call(ToolCall("calculator", {}))
    assert "unknown x" in box.call(ToolCall("calculator", {"expression": "1", "x": 2}))
    assert "must be a string" in box.call(ToolCall("calculator", {"expression": 12}))
    assert box.call(ToolCall("", error="bad JSON")) == "error: bad JSON"


def test_search_and_memory_tools_need_their_sources():
    with pytest.raises(ValueError, match="--docs"):
        builtin_toolbox(["search"])
    with pytest.raises(ValueError, match="built-in tools are calculator, search, memory"):
        builtin_toolbox(["weather"])


# ---- the agent loop ------------------------------------------------------------------------------------------------

def scripted(*answers):
    """An Answerer that says the given texts in turn, and records what it was shown."""
    seen = []

    def answer(messages, tools):
        seen.append((list(messages), tools))
        return answers[len(seen) - 1]
    answer.seen = seen
    return answer


def call(expression):
    return f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


def test_the_loop_runs_the_call_and_the_model_answers_with_the_result():
    model = scripted(call("37*91"), "37*91 = 3367.")
    events = []
    result = run_agent(model, [{"role": "user", "content": "What is 37*91?"}], builtin_toolbox(["calculator"]),
                       on_event=lambda kind, data: events.append((kind, data.get("content"))))
    assert result.answer == "37*91 = 3367." and result.steps == 2 and not result.stopped
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    second_prompt, tools = model.seen[1]
    assert second_prompt[-1] == {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "3367"}
    assert tools == SCHEMAS and events == [("tool_call", None), ("tool_result", "3367")]


def test_a_tool_error_goes_back_to_the_model_which_may_try_again():
    model = scripted(call("37*"), call("37*91"), "3367")
    result = run_agent(model, [{"role": "user", "content": "37*91?"}], builtin_toolbox(["calculator"]))
    assert [c[2] for c in result.calls] == ["error: the expression ends too early (a number or ')' is missing)", "3367"]
    assert result.answer == "3367"


def test_the_step_limit_stops_a_model_that_never_answers():
    model = scripted(*[call("1+1")] * 10)
    result = run_agent(model, [{"role": "user", "content": "?"}], builtin_toolbox(["calculator"]), max_steps=3)
    assert result.stopped and result.answer == "" and result.steps == 3 and len(model.seen) == 3


def test_the_loop_runs_on_a_real_model_and_its_prompt_offers_the_tools(tok, monkeypatch):
    """A tiny random model (its answers are noise, without tool calls): one step, the answer is what it streamed,
    and the prompt it was given carries the calculator's schema."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=1, n_head=2, n_embd=32))
    engine = Engine(model, tok, chat=True)
    prompts, real = [], engine.chat_ids
    monkeypatch.setattr(engine, "chat_ids", lambda messages, tools=None: prompts.append(real(messages, tools)) or prompts[-1])
    pieces = []
    answerer = engine_answerer(engine, SamplingParams.greedy(8), on_text=pieces.append)
    result = run_agent(answerer, [{"role": "user", "content": "What is 2+3?"}], Toolbox([calculator_tool()]))
    assert result.steps == 1 and result.answer == "".join(pieces).strip()
    assert json.dumps(SCHEMAS[0]) in tok.decode(prompts[0])


def test_a_text_model_cannot_call_tools(tok):
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)),
                    tok, chat=False)
    with pytest.raises(ValueError, match="tools need a chat model"):
        engine_answerer(engine, SamplingParams.greedy(4))
