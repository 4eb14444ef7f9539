"""serve.py: the OpenAI-compatible API on a live loopback server, with the official openai client."""
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest

from engine import Engine, LoadConfig, SamplingParams
from serve import Limits, create_app, running_server

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


def post(url: str, payload, timeout: float = 60) -> tuple[int, dict]:
    """POST JSON (or raw bytes) and return (status, parsed body), for the error cases."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream_events(url: str, payload) -> list:
    """POST a streaming request; its server-sent events, parsed ("[DONE]" stays a string)."""
    request = urllib.request.Request(url, data=json.dumps({**payload, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        lines = [line.decode().strip() for line in reply if line.startswith(b"data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def wait_until(condition, what: str, seconds: float = 30):
    """Poll condition() until it holds; fail naming `what` if it has not after `seconds` (a hang, not a timing)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {seconds} s: {what}"
        time.sleep(0.01)


class Stall:
    """Replaces engine.stream: a batch pauses after its first piece of text until every row in it
    is cancelled (its client left) or `release` is set, so a test can act while the worker is busy.
    `paused` is set once it pauses; `cancelled_rows` counts the rows it saw cancelled while paused."""

    def __init__(self, engine, monkeypatch):
        self.real, self.release, self.paused, self.cancelled_rows = engine.stream, threading.Event(), threading.Event(), 0
        monkeypatch.setattr(engine, "stream", self.stream)

    def stream(self, prompts, *args, cancelled, **kwargs):
        for i, delta in enumerate(self.real(prompts, *args, cancelled=cancelled, **kwargs)):
            yield delta
            self.paused.set()
            deadline = time.monotonic() + 30
            while i == 0 and not self.release.is_set() and time.monotonic() < deadline:
                if all(cancelled(row) for row in range(len(prompts))):
                    self.cancelled_rows += len(prompts)
                    break
                time.sleep(0.01)


@pytest.fixture
def stall(server, monkeypatch):
    stall = Stall(server[1].state.api.engine, monkeypatch)
    yield stall
    stall.release.set()


@contextmanager
def second_server(server, **limits):
    """Another app on the same engine, with other limits (its own queue and worker)."""
    app = create_app(server[1].state.api.engine, SamplingParams(), MODEL, max_batch=16, limits=Limits(**limits))
    with running_server(app) as url:
        yield url, app


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


def test_a_seed_reproduces_a_sampled_answer_and_another_seed_changes_it(client):
    def ask(seed: int):
        return client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=1.5, top_p=1.0,
                                          seed=seed, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text
    assert ask(123) == ask(123)
    # a seed that were ignored would give one answer for all; eight seeds agreeing by chance at this
    # temperature is next to impossible
    assert len({ask(seed) for seed in range(8)}) > 1


def test_best_of_samples_n_answers_and_keeps_the_majoritys(client, server):
    """best_of 4 at a high temperature: four different answers (a seed gives each its own: seed, seed + 1, ...),
    one kept by the vote and returned as the message; the same seed repeats the whole choice; usage counts all four."""
    def ask():
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.5, seed=7,
                                              top_p=1.0, extra_body={"best_of": 4, "top_k": 0, "min_p": 0.0})
    reply = ask()
    best = reply.model_extra["best_of"]
    assert best["n"] == 4 and best["picked_by"] == "vote" and best["why"].startswith("vote ")
    assert len(set(best["answers"])) > 1                      # four seeds agreeing by chance: next to impossible
    assert reply.choices[0].message.content in best["answers"]
    assert 6 < reply.usage.completion_tokens <= 4 * 6           # more than one answer's worth: all four count
    assert ask().model_extra["best_of"] == best
    status, body = post(server[0] + "/v1/completions", dict(prompt="hello", best_of=2))
    assert status == 400 and "/v1/chat/completions" in body["error"]["message"]


def test_best_of_with_a_verifier_weighs_the_vote_by_its_scores(hello_ckpt):
    import torch

    from scoring import RewardModel
    engine = Engine.load(LoadConfig(ckpt=str(hello_ckpt), chat="on"))
    verifier = RewardModel(Engine.load(LoadConfig(ckpt=str(hello_ckpt), chat="on")).model)
    torch.manual_seed(0)
    torch.nn.init.normal_(verifier.value_head.weight)         # an untrained head still ranks: scores differ
    with running_server(create_app(engine, SamplingParams(), MODEL, verifier=verifier)) as url:
        status, reply = post(url + "/v1/chat/completions", dict(messages=HELLO, max_tokens=5, temperature=1.5, seed=3,
                                                                top_k=0, min_p=0.0, best_of=3))
    best = reply["best_of"]
    assert status == 200 and best["picked_by"] == "verifier" and len(set(best["scores"])) == 3
    assert best["why"].startswith("verifier-weighted vote")
    # three different answers: one vote each, weighed by sigmoid(score), so the highest-scored one wins
    assert len({a.strip() for a in best["answers"]}) == 3, best["answers"]
    kept = max(range(3), key=lambda i: best["scores"][i])
    assert reply["choices"][0]["message"]["content"] == best["answers"][kept]


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
    (dict(messages=HELLO, max_completion_tokens=0), 400, "max_completion_tokens", None),
    (dict(messages=HELLO, max_completion_tokens=0, max_tokens=5), 400, "max_completion_tokens", None),
    (dict(messages=HELLO, seed=2**64), 400, "seed", None),         # torch cannot take it
    (dict(messages=HELLO, seed=-1), 400, "seed", None),
    (dict(messages=HELLO, stop=["a", "b", "c", "d", "e"]), 400, "stop", None),   # at most 4, as in OpenAI
    (dict(messages=[{"role": "user", "content": "hello world " * 40}]), 400, "messages", "context_length_exceeded"),
    (dict(messages=HELLO, top_p=1.5), 400, "top_p", None),
    (dict(messages=HELLO, temperature=-1), 400, "temperature", None),
    (dict(messages="hello"), 400, "messages", None),
    (b"{not json", 400, None, None),
    (dict(messages=HELLO, best_of=0), 400, "best_of", None),
    (dict(messages=HELLO, best_of=17), 400, "best_of", None),        # more than --max_prompts
    (dict(messages=HELLO, best_of=2, stream=True), 400, "best_of", None),
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


def test_max_completion_tokens_wins_over_max_tokens(server):
    status, reply = post(server[0] + "/v1/chat/completions", dict(messages=HELLO, max_completion_tokens=2, max_tokens=6))
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_too_many_prompts_in_one_request_get_a_400(server):
    status, body = post(server[0] + "/v1/completions", dict(prompt=["hello"] * 17, max_tokens=2))
    assert status == 400 and body["error"]["param"] == "prompt" and "16" in body["error"]["message"]
    status, reply = post(server[0] + "/v1/completions", dict(prompt=["hello"] * 16, max_tokens=2))
    assert status == 200 and len(reply["choices"]) == 16


@pytest.mark.parametrize("chunked", [False, True])     # with a Content-Length, and without one
def test_a_body_over_the_limit_gets_a_413_json_error(server, chunked):
    body = json.dumps(dict(prompt="hello " * 200_000, max_tokens=2)).encode()       # 1.2 MB
    address = urlparse(server[0])
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
        conn.request("POST", "/v1/completions", body=pieces if chunked else body, encode_chunked=chunked,
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["message"].startswith("request body too large")
    finally:
        conn.close()
    status, ok = post(server[0] + "/v1/completions", dict(prompt="hello", max_tokens=2))
    assert status == 200 and ok["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("breaks", ["stream", "generator"])   # inside the engine's loop, and before it
def test_a_failure_while_generating_is_a_generic_500_and_the_worker_lives_on(server, monkeypatch, breaks):
    engine = server[1].state.api.engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of /home/someone/model")
    monkeypatch.setattr(engine, breaks, broken)
    request = dict(prompt="hello", max_tokens=3, seed=7)          # seeded: the worker asks engine.generator
    status, body = post(server[0] + "/v1/completions", request, timeout=30)
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "secret" not in body["error"]["message"] and "RuntimeError" not in body["error"]["message"]
    events = stream_events(server[0] + "/v1/completions", request)
    assert "secret" not in events[-2]["error"]["message"] and events[-1] == "[DONE]"   # an error, then the end
    monkeypatch.undo()
    status, ok = post(server[0] + "/v1/completions", request)
    assert status == 200 and ok["usage"]["completion_tokens"] == 3


def test_an_unexpected_error_in_a_request_is_a_generic_500_json_error(server, monkeypatch):
    def broken(text):
        raise KeyError("secret internals")
    monkeypatch.setattr(server[1].state.api.engine, "text_ids", broken)
    status, body = post(server[0] + "/v1/completions", dict(prompt="hello", max_tokens=2))
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in body["error"]["message"]


def test_tokenizing_a_prompt_does_not_stall_other_clients(server, monkeypatch):
    engine, tokenizing, release = server[1].state.api.engine, threading.Event(), threading.Event()
    real = engine.text_ids

    def slow_text_ids(text):                  # a prompt that takes long to tokenize: until released
        tokenizing.set()
        release.wait(30)
        return real(text)
    monkeypatch.setattr(engine, "text_ids", slow_text_ids)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(post, server[0] + "/v1/completions", dict(prompt="hello", max_tokens=2))
        wait_until(tokenizing.is_set, "the prompt to reach the tokenizer")
        try:
            with urllib.request.urlopen(server[0] + "/v1/models", timeout=10) as reply:   # answered meanwhile
                assert json.loads(reply.read())["data"][0]["id"] == MODEL
        finally:
            release.set()
        assert slow.result()[0] == 200


def test_a_full_queue_answers_429_and_the_queued_requests_are_still_answered(server, stall):
    with second_server(server, max_waiting=1, max_prompts=1) as (url, app):
        worker, request = app.state.api.worker, dict(prompt="hello", max_tokens=3)
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(post, url + "/v1/completions", request)          # generating (stalled)
            wait_until(lambda: worker.active, "the first request to start")
            second = pool.submit(post, url + "/v1/completions", request)         # waits its turn
            wait_until(lambda: worker.queued() == 1, "the second request to queue")
            status, body = post(url + "/v1/completions", request)
            assert status == 429 and body["error"]["message"].startswith("server busy, retry later")
            stall.release.set()
            assert first.result()[0] == second.result()[0] == 200


def test_a_non_streaming_client_that_hangs_up_has_its_answer_cancelled(server, stall):
    worker = server[1].state.api.worker
    address = urlparse(server[0])
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(dict(prompt="hello", max_tokens=40)),
                 headers={"Content-Type": "application/json"})
    wait_until(stall.paused.is_set, "the answer to start")
    conn.close()                                                 # hang up while it is generating
    wait_until(lambda: stall.cancelled_rows == 1, "the answer nobody waits for to be cancelled")
    wait_until(lambda: not worker.active, "the worker to be free again")


def test_a_streaming_client_that_hangs_up_has_its_answer_cancelled(server, stall):
    worker = server[1].state.api.worker
    request = urllib.request.Request(server[0] + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps(dict(prompt="hello", max_tokens=40, stream=True)).encode())
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.readline().startswith(b"data: ")            # one event, then hang up
    wait_until(lambda: stall.cancelled_rows == 1, "the answer nobody reads to be cancelled")
    wait_until(lambda: not worker.active, "the worker to be free again")


def test_sixteen_streaming_clients_and_a_burst_of_bad_requests_at_once(server, client):
    prompts = ["hello", "你好", "world", "世界。", "h", "hello world", "你", ", 你好", "lo", "好世界",
               "o", "hello, 你好", "界", "world, 世界", "he", "llo"]

    def good(i: int):
        stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=i + 1, temperature=0,
                                           stream=True)
        chunks = [c.choices[0] for c in stream]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    bad = [dict(prompt="hello", seed=2**64), dict(prompt="hello", max_completion_tokens=0),
           dict(prompt="hello", stop=["a"] * 5), dict(prompt=["hello"] * 17), dict(prompt="hello", top_p=2),
           dict(prompt="hello", model="gpt-4"), b"{not json", dict(prompt="hello " * 200_000)] * 2

    def refused(i: int) -> int:
        return post(server[0] + "/v1/completions", bad[i])[0]

    alone = [good(i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = [pool.submit(good, i) for i in range(16)]
        statuses = list(pool.map(refused, range(len(bad))))
        assert [a.result() for a in answers] == alone            # every good client: its whole answer
    assert all(400 <= status < 500 for status in statuses), statuses
