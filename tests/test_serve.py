"""serve.py: the OpenAI-compatible API on a live loopback server, with the official openai client."""
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import Engine, LoadConfig, SamplingParams
from serve import create_app, running_server

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (requirements-dev.txt)")

MODEL = "hello"


@pytest.fixture(scope="module")
def server(hello_ckpt):
    """A live server on a free loopback port: (base URL, the app)."""
    engine = Engine.load(LoadConfig(ckpt=str(hello_ckpt), chat="on"))
    app = create_app(engine, SamplingParams(), MODEL, max_batch=16)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, payload) -> tuple[int, dict]:
    """POST JSON (or raw bytes) and return (status, parsed body), for the error cases."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HELLO = [{"role": "user", "content": "hello"}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_with_the_openai_client(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 10


def test_streamed_chat_arrives_in_pieces_that_add_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3                                             # token by token, not all at once
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_text_completion_and_a_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0).choices[0]
    assert full.text and full.finish_reason == "length"
    cut = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0, stop=["o"]).choices[0]
    assert cut.text == full.text.split("o")[0] and cut.finish_reason == ("stop" if "o" in full.text else "length")


def test_a_seed_reproduces_a_sampled_answer(client):
    def ask():
        return client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=1.5, top_p=1.0,
                                          seed=123, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text
    assert ask() == ask()


def test_sixteen_concurrent_clients_each_get_their_own_complete_answer(server, client):
    prompts = ["hello", "你好", "world", "世界。", "h", "hello world", "你", ", 你好", "lo", "好世界",
               "o", "hello, 你好", "界", "world, 世界", "he", "llo"]
    # client i asks for i + 1 tokens: answers of the wrong length or text would show any mix-up
    def ask(i: int):
        reply = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=i + 1, temperature=0)
        return reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason
    alone = [ask(i) for i in range(16)]                     # one at a time: batches of one
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    assert [tokens for _, tokens, _ in together] == list(range(1, 17))
    assert server[1].state.api.worker.largest_batch > 1      # they really were generated in batches


@pytest.mark.parametrize("payload,status,param,code", [
    (dict(model="gpt-4", messages=HELLO), 404, "model", "model_not_found"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages", None),
    (dict(messages=HELLO, max_tokens=0), 400, "max_tokens", None),
    (dict(messages=HELLO, max_tokens=100000), 400, "max_tokens", None),
    (dict(messages=[{"role": "user", "content": "hello world " * 40}]), 400, "messages", "context_length_exceeded"),
    (dict(messages=HELLO, top_p=1.5), 400, "top_p", None),
    (dict(messages=HELLO, temperature=-1), 400, "temperature", None),
    (dict(messages="hello"), 400, "messages", None),
    (b"{not json", 400, None, None),
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, payload, status, param, code):
    got_status, body = post(server[0] + "/v1/chat/completions", payload)
    assert got_status == status
    assert body["error"]["message"] and body["error"]["param"] == param and body["error"]["code"] == code
    ok_status, ok = post(server[0] + "/v1/chat/completions", dict(messages=HELLO, max_tokens=3))
    assert ok_status == 200 and ok["usage"]["completion_tokens"] == 3


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server, client):
    request = urllib.request.Request(server[0] + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps(dict(prompt="hello", max_tokens=40, stream=True)).encode())
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.readline().startswith(b"data: ")            # one event, then hang up
    reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert reply.usage.completion_tokens == 4


def test_the_chat_page_is_served(server):
    with urllib.request.urlopen(server[0] + "/", timeout=60) as reply:
        page = reply.read().decode()
    assert reply.headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page
