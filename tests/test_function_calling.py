"""serve.py's function calling (OpenAI "tools" -> message.tool_calls, streamed too) and --docs, with the official
openai client. The model is scripted (a tiny random model's engine whose stream says given texts), so the tests
check the server's side of the protocol exactly; tests/test_tools.py runs the agent loop on a real model."""
import json
import urllib.error
import urllib.request

import pytest
import torch

from engine import Delta, Engine, SamplingParams
from model import GPT, ModelConfig
from memory import Memory
from retrieval import Index
from serve import ToolCallStream, create_app, running_server
from tokenizer import Tokenizer
from tools import builtin_toolbox, calculate, calculator_tool, format_number

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (requirements-dev.txt)")

CALCULATOR = calculator_tool().schema()
ASK = [{"role": "user", "content": "What is 2+3?"}]
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Script:
    """Replaces engine.stream: each batch row answers with the next scripted text, in pieces of 3
    characters (so tags arrive split); the prompts it was given are kept, as text."""

    def __init__(self, engine, monkeypatch):
        self.engine, self.answers, self.prompts = engine, [], []
        monkeypatch.setattr(engine, "stream", self.stream)

    def stream(self, prompts, params, max_new_tokens=None, stop=None, generator=None, cancelled=None, **kwargs):
        for row, ids in enumerate(prompts):
            self.prompts.append(self.engine.tokenizer.decode(ids))
            text = self.answers.pop(0)
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
            for n, piece in enumerate(pieces, 1):
                yield Delta(row, piece, n, "stop" if n == len(pieces) else None)


@pytest.fixture(scope="module")
def app_and_url(tmp_path_factory):
    tok = Tokenizer.from_texts([CALL_TEXT + " What is 2+3? The capital of Zorbia is Quellin.\n" * 20],
                               vocab_size=300, progress=False)
    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=32)),
                    tok, chat=True)
    docs = tmp_path_factory.mktemp("docs")
    (docs / "zorbia.md").write_text("The capital of Zorbia is Quellin.\n\nZorbia exports salt.\n", encoding="utf-8")
    (docs / "other.md").write_text("Bread is made of flour.\n", encoding="utf-8")
    app = create_app(engine, SamplingParams(), "tiny", toolbox=builtin_toolbox(["calculator"]))
    docs_app = create_app(engine, SamplingParams(), "tiny", index=Index.from_folder(docs), docs_k=1)
    with running_server(app) as url, running_server(docs_app) as docs_url:
        yield engine, url, docs_url


@pytest.fixture
def script(app_and_url, monkeypatch):
    return Script(app_and_url[0], monkeypatch)


@pytest.fixture
def client(app_and_url):
    return openai.OpenAI(base_url=app_and_url[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_round_trip_a_call_then_the_answer(client, script):
    script.answers = [CALL_TEXT, "2+3 = 5."]
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[CALCULATOR])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"expression": "2+3"}
    assert json.dumps(CALCULATOR) in script.prompts[0]                      # the tool was offered in the prompt

    result = format_number(calculate(**json.loads(call.function.arguments)))   # the client runs the tool
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[CALCULATOR])
    assert second.choices[0].message.content == "2+3 = 5." and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    assert (f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in script.prompts[1]


def test_a_streamed_call_arrives_as_delta_tool_calls_after_the_text_before_it(client, script):
    script.answers = ["Let me compute.\n" + CALL_TEXT]
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[CALCULATOR], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me compute.\n" and "<tool" not in content
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "calculator", {"expression": "2+3"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_none_offers_no_tools_and_without_tools_a_call_is_just_text(client, script):
    script.answers = [CALL_TEXT, CALL_TEXT]
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[CALCULATOR], tool_choice="none")
    assert "# Tools" not in script.prompts[0] and reply.choices[0].message.content == CALL_TEXT
    plain = client.chat.completions.create(model="tiny", messages=ASK)
    assert plain.choices[0].message.content == CALL_TEXT and plain.choices[0].finish_reason == "stop"


def test_a_broken_call_comes_back_as_the_text_the_model_wrote(client, script):
    script.answers = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>']
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[CALCULATOR])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content.startswith("<tool_call>")


@pytest.mark.parametrize("payload,message", [
    ({"tools": [CALCULATOR], "tool_choice": "required"}, "cannot force a tool call"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
])
def test_what_the_server_cannot_do_is_a_400(client, script, payload, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, **payload)
    assert message in str(e.value)


def test_docs_put_the_best_passage_in_the_prompt_and_name_the_source(app_and_url, script):
    docs_client = openai.OpenAI(base_url=app_and_url[2] + "/v1", api_key="unused", max_retries=0, timeout=60)
    script.answers = ["Quellin [zorbia.md#0]."]
    reply = docs_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Capital of Zorbia?"}])
    assert [s["source"] for s in reply.model_extra["sources"]] == ["zorbia.md#0"]
    assert "[zorbia.md#0] The capital of Zorbia is Quellin." in script.prompts[0] and "Bread" not in script.prompts[0]


def test_the_tool_call_filter_holds_back_a_split_tag_and_releases_what_is_not_one():
    stream = ToolCallStream()
    assert stream.push("a <to") == "a " and stream.push("p> b") == "<top> b"
    assert stream.push("<tool_") == "" and stream.push('call>{"name": "f", "arguments": {}}') == ""
    content, calls = stream.finish()
    assert content == "" and [c["function"]["name"] for c in calls] == ["f"]


def test_the_servers_own_tools_are_listed_and_run_at_v1_tools_call(app_and_url, client):
    assert [t["function"]["name"] for t in client.models.list().data[0].model_extra["tools"]] == ["calculator"]
    url = app_and_url[1] + "/v1/tools/call"
    assert post(url, {"name": "calculator", "arguments": {"expression": "6*7"}}) == (200, {"name": "calculator", "content": "42"})
    status, body = post(url, {"name": "calculator", "arguments": {"expression": "6*"}})
    assert status == 200 and body["content"].startswith("error: the expression ends too early")
    status, body = post(url, {"name": "shell", "arguments": {"command": "ls"}})
    assert status == 404 and "no tool 'shell' on this server; it has calculator" in body["error"]["message"]
    status, body = post(app_and_url[2] + "/v1/tools/call", {"name": "calculator", "arguments": {}})
    assert status == 404 and "it has none" in body["error"]["message"]


def test_memory_recalls_an_old_turn_into_the_prompt_and_stores_the_new_one(app_and_url, script, tmp_path):
    engine = app_and_url[0]
    memory = Memory(tmp_path / "me.db")
    memory.persona = "You are Pip."
    memory.add_turn("user", "My cat is called Miso.")
    app = create_app(engine, SamplingParams(), "tiny", memory=memory)
    script.answers = ["Miso.", "Hello!"]
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is my cat called?"}])
        assert reply.model_extra["memories"] == ["user: My cat is called Miso."]
        assert script.prompts[0].startswith("<|im_start|>system\nYou are Pip.\n\nThings you remember from earlier "
                                             "conversations:\n- user: My cat is called Miso.<|im_end|>")
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert [(r, c) for _, r, c in memory.turns()][1:] == [("user", "What is my cat called?"), ("assistant", "Miso."),
                                                          ("user", "hi"), ("assistant", "Hello!")]
