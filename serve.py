"""
serve.py -- a model behind an OpenAI-compatible HTTP API, with a web chat page.

    python serve.py                               # weight/pretrain at http://127.0.0.1:8000/
    python serve.py --ckpt weight/sft --port 8080 # a chat model; open the page in a browser

    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}], "stream": true}'

    from openai import OpenAI                     # any OpenAI client works
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "hi"}])

Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions (with
"stream": true they answer as server-sent events, token by token), GET / (the chat
page, web/index.html). Every request is checked first (model, roles, max_tokens,
sampling values, seed, prompt length) and a bad one gets a 4xx JSON error in OpenAI's shape
{"error": {"message", "type", "param", "code"}}; the server keeps serving.

Limits (flags): a request body of at most --max_body_bytes (413 past it), at most
--max_prompts prompts and --max_stop stop strings per request (400), at most
--max_waiting requests queued for the model (429 "server busy, retry later"). A client
that hangs up, streaming or not, has its answer cancelled. An unexpected failure is a
500 with a generic message; its traceback goes to the server's log, never to the client.

Function calling (OpenAI's "tools"): a chat request may offer tools (JSON schemas); they go
into the system prompt in the Qwen2.5/Hermes form (tokenizer/chat.py), and <tool_call> blocks
in the answer come back as message.tool_calls with finish_reason "tool_calls" (streamed: the
text before a call streams as content, each call arrives as a delta.tool_calls). The client
runs the tool and sends the result as a {"role": "tool"} message. tool_choice "auto" (the
default) lets the model choose, "none" offers no tools; forcing a call ("required", a named
function) needs constrained decoding, which this server does not do: it answers 400.

Retrieval (--docs FOLDER): the last user message of a chat gets the best passages of the
folder (retrieval.py) with their sources; the answer's "sources" field lists them.

Long-term memory (--memory FILE.db, memory.py): each chat question recalls the stored turns and
notes that share its rare words (those not already in the request's messages) into the system
prompt, the answer's "memories" field lists them, and the question and the final answer are
stored. A request without a system message gets the stored persona. One file, one user: a
personal server.

Best of N (inference-time scaling): a chat request with "best_of": N (OpenAI's name, from its
completions API) has N answers sampled together and gets one back: the first answer reaching
the final answer most of them reach (self-consistency); with --verifier (verifier.py) each
answer's vote weighs sigmoid(its score), and of the winners the highest-scored one is kept.
The response's "best_of" field shows every answer and why one was kept; usage counts all N.
Not with streaming: the choice needs every answer finished.

Built-in tools (--tools calculator,search,memory): GET /v1/models lists their schemas and
POST /v1/tools/call {"name", "arguments"} runs one ({"content": result text}); the web page
offers them to the model and runs the agent loop itself, showing each call and result. (The
chat endpoint stays OpenAI's: it returns calls, it never runs them.)

Concurrency: one worker thread owns the model. Requests wait in a queue; whatever is
waiting when the worker is free is generated together as one left-padded batch (those
with the same sampling settings; a seeded request runs alone, so its seed reproduces).
Every row streams into its own queue, so answers never mix. FastAPI + uvicorn do the
HTTP: parsing, validation, streaming responses, many connections at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from engine import Delta, Engine, LoadConfig, SamplingParams
from flags import arg, main_guard, parse_config
from memory import Memory, system_with_memories
from retrieval import Index, with_sources
from scoring import pick_best, score_answers, verifier_for
from tokenizer.chat import TOOL_CALL_OPEN, ToolCall, check_messages, parse_tool_calls
from tools import BUILTIN, Toolbox, builtin_toolbox
from weight.checkpoint import ROOT

WEB_PAGE = ROOT / "web" / "index.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_SEED = 2**63 - 1               # the largest seed torch.Generator.manual_seed takes on every platform
DISCONNECT_POLL_S = 0.25           # how often a waiting non-streaming request checks that its client is still there
log = logging.getLogger("uvicorn.error")    # uvicorn's error log: our errors print like its own


@dataclass
class Limits:
    """How much one request, and the queue, may ask of the server: without them one client
    could fill its memory (a huge body, thousands of prompts) or keep everyone else waiting."""
    max_body_bytes: int = arg(1_000_000, "largest request body in bytes (413 beyond it)")
    max_prompts: int = arg(16, "most prompts in one /v1/completions request")
    max_stop: int = arg(4, "most stop strings in one request (OpenAI allows 4)")
    max_waiting: int = arg(64, "most requests (prompts) waiting for the model; more get 429 'server busy'")

    def check(self):
        for name in ("max_body_bytes", "max_prompts", "max_stop", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < self.max_prompts:
            raise ValueError(f"--max_waiting ({self.max_waiting}) must be at least --max_prompts "
                             f"({self.max_prompts}), or the largest request could never be queued")


@dataclass
class ServeConfig(Limits, LoadConfig):
    host: str = arg("127.0.0.1", "address to listen on: 127.0.0.1 = this machine only, 0.0.0.0 = every network "
                                 "this machine is on (anyone there can use the model)")
    port: int = arg(8000, "port to listen on")
    model_name: str = arg("", "the model id clients ask for ('' = the checkpoint folder's name)")
    max_batch: int = arg(16, "most requests generated together as one batch")
    docs: str = arg("", "a folder of .txt/.md files: each chat question gets the best passages, cited")
    docs_k: int = arg(3, "with --docs: how many passages")
    tools: str = arg("", f"built-in tools offered at POST /v1/tools/call and on the web page ({', '.join(BUILTIN)}; "
                         "search needs --docs, memory --memory)")
    memory: str = arg("", "a SQLite memory file (inference.py --memory): old turns recalled into each chat, "
                          "new ones stored; --tools memory reads and writes it too")
    memory_k: int = arg(3, "with --memory: most remembered items put into a prompt")
    verifier: str = arg("", "a verifier folder (verifier.py): chat requests with best_of N keep the majority's "
                            "final answer with each vote weighed by its score (without one: one vote each)")


# ----------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    """A request the server refuses: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# What a client hears when generation fails: the exception's text may hold paths or internals, so it
# goes to the server's log only
GENERATION_FAILED = "generation failed: an error inside the server (its log has the details)"
INTERNAL_ERROR = "internal server error (the server's log has the details)"


# ----------------------------------------------------------------------------------
# The worker: one thread, one model, batches of queued requests


@dataclass
class Job:
    """One answer to generate. The worker puts Deltas (or an exception) into `deltas`."""
    ids: list[int]
    params: SamplingParams
    budget: int                                   # tokens it may generate (max_tokens, within the context)
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False                       # the client went away: stop generating for it

    def put(self, item):
        """Called from the worker thread: hand the item to the event loop that awaits it."""
        try:
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)
        except RuntimeError:          # the event loop is closed (the server stopped): nobody is listening
            self.cancelled = True


class BatchWorker:
    """Takes jobs from a queue and runs them in batches on the engine, in its own thread.
    `waiting` holds the jobs taken from the queue but not yet started, `active` the batch
    being generated now (the tests watch both)."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.rng = engine.generator(-1)          # unseeded requests share one random stream
        self.largest_batch = 0                   # for the curious (and the tests): did batching happen?
        threading.Thread(target=self.run, name="generation", daemon=True).start()

    def submit(self, job: Job):
        self.jobs.put(job)

    def queued(self) -> int:
        """How many jobs wait for their turn (read from the event loop: a moment's miscount is harmless)."""
        return self.jobs.qsize() + len(self.waiting)

    def run(self):
        while True:
            batch = self.take()
            self.active = batch
            try:
                self.generate(batch)
            except Exception:   # one bad batch must not stop the only thread that generates
                log.exception("generation failed for a batch of %d request(s)", len(batch))
                for job in batch:
                    job.put(RuntimeError(GENERATION_FAILED))
            finally:
                self.active = []

    def take(self) -> list[Job]:
        """Wait for work, then take the next batch out of everything that is waiting."""
        while True:
            if not self.waiting:
                self.waiting = [self.jobs.get()]     # sleep until there is work
            while not self.jobs.empty():             # then take everything that has arrived
                self.waiting.append(self.jobs.get())
            self.waiting = [job for job in self.waiting if not job.cancelled]
            if self.waiting:
                batch = self.next_batch(self.waiting)
                self.waiting = [job for job in self.waiting if all(job is not b for b in batch)]
                return batch

    def next_batch(self, waiting: list[Job]) -> list[Job]:
        """The oldest job, plus later ones that can share its batch: the same sampling settings,
        no seed, and longest prompt + largest budget within the context (see engine.pack_batches)."""
        batch = [waiting[0]]
        if waiting[0].params.seed >= 0:
            return batch
        settings = waiting[0].params.decode_kwargs()
        # left padding shares one context between prompt and answer; an encoder-decoder's answer has its own
        limit = self.engine.context if not self.engine.seq2seq else float("inf")
        for job in waiting[1:]:
            trial = batch + [job]
            if (len(trial) <= self.max_batch and job.params.seed < 0 and job.params.decode_kwargs() == settings
                    and max(len(j.ids) for j in trial) + max(j.budget for j in trial) <= limit):
                batch = trial
        return batch

    def generate(self, batch: list[Job]):
        """Stream one batch; a row whose client went away (job.cancelled) stops at its next token."""
        params = batch[0].params
        rng = self.engine.generator(params.seed) if params.seed >= 0 else self.rng
        self.largest_batch = max(self.largest_batch, len(batch))
        for delta in self.engine.stream([j.ids for j in batch], params, [j.budget for j in batch],
                                        [j.params.stop for j in batch], rng,
                                        cancelled=lambda row: batch[row].cancelled):
            batch[delta.row].put(delta)


async def deltas_of(job: Job):
    """A job's deltas as they arrive, up to the one with finish_reason. If the caller stops
    early (a client disconnected), the row is cancelled."""
    try:
        while True:
            delta = await job.deltas.get()
            if isinstance(delta, Exception):     # the worker failed; the details are in its log
                raise ApiError(500, GENERATION_FAILED)
            yield delta
            if delta.finish_reason:
                return
    finally:
        job.cancelled = True


# ----------------------------------------------------------------------------------
# Requests


class GenerationRequest(BaseModel):
    """Fields both endpoints share (OpenAI's names; top_k, min_p, repetition_penalty as in vLLM).
    Unset fields take the server's defaults (its --temperature etc.)."""
    model_config = ConfigDict(extra="ignore")    # clients send more fields (user, logprobs...): ignore them
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)   # checked here: a seed torch refuses would fail later
    n: int = 1
    best_of: Optional[int] = None                          # N answers sampled, one kept (chat; see the top)
    stream: bool = False
    stream_options: Optional[dict] = None


class ChatRequest(GenerationRequest):
    messages: list
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None


class CompletionRequest(GenerationRequest):
    prompt: Union[str, list[str]]


class ToolRunRequest(BaseModel):
    name: str
    arguments: dict = Field(default_factory=dict)


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "seed")


def text_of(content) -> str:
    """A message's content: a string, or OpenAI's list of parts [{"type": "text", "text": ...}]."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return content


def chat_message(message):
    """An OpenAI message -> ours: "developer" is a system message, content parts become text, tool
    calls and the tool role stay (anything else is left for check_messages to refuse)."""
    if not isinstance(message, dict):
        return message
    role = message.get("role")
    ours = {"role": "system" if role == "developer" else role, "content": text_of(message.get("content"))}
    if message.get("tool_calls") is not None:
        ours["tool_calls"] = message["tool_calls"]
    return ours


def offered_tools(request: "ChatRequest") -> Optional[list]:
    """The tools to put in the prompt: None when there are none or tool_choice is "none";
    a tools list that is not OpenAI's shape, or a tool_choice that would force a call, is a 400."""
    choice = request.tool_choice
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported: this server cannot force a tool call "
                            f"(that needs constrained decoding); use \"auto\" or \"none\"", "tool_choice")
    if not request.tools:
        return None
    for i, tool in enumerate(request.tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict) \
                or not isinstance(tool["function"].get("name"), str):
            raise ApiError(400, f'tools[{i}]: expected {{"type": "function", "function": {{"name": ..., '
                                f'"parameters": {{...}}}}}}', f"tools[{i}]")
    return None if choice == "none" else request.tools


def tool_call_entries(calls) -> list[dict]:
    """Parsed calls -> OpenAI's message.tool_calls (arguments as JSON text, fresh ids)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def split_answer(text: str) -> tuple[Optional[str], list[dict]]:
    """A whole answer -> (content, tool_calls). Only well-formed calls become tool_calls; if any block
    is broken, the text is returned as it is (the client sees what the model wrote)."""
    content, calls = parse_tool_calls(text)
    if not calls or any(c.error for c in calls):
        return text, []
    return content or None, tool_call_entries(calls)


class ToolCallStream:
    """Streaming with tools: text is content until a <tool_call> begins; from there it is held, and
    parsed into calls when the answer ends. Text that might be the start of "<tool_call>" waits
    (like a stop string in engine.TextStream) until it is clearly not."""

    def __init__(self):
        self.pending, self.in_call = "", False

    def push(self, text: str) -> str:
        """Add generated text; return the content that is now safe to send."""
        self.pending += text
        if self.in_call:
            return ""
        at = self.pending.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.in_call = True
            out, self.pending = self.pending[:at], self.pending[at:]
            return out
        keep = max((n for n in range(1, len(TOOL_CALL_OPEN)) if self.pending.endswith(TOOL_CALL_OPEN[:n])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls) at the end of the answer."""
        text, self.pending = self.pending, ""
        if not self.in_call:
            return text, []
        content, calls = split_answer(text)
        return (content or "", calls) if calls else (text, [])


class Api:
    """The endpoints' logic, around one engine and one worker."""

    def __init__(self, engine: Engine, defaults: SamplingParams, model_name: str, max_batch: int, limits: Limits,
                 index: Optional[Index] = None, docs_k: int = 3, toolbox: Optional[Toolbox] = None,
                 memory: Optional[Memory] = None, memory_k: int = 3, verifier=None):
        self.engine, self.defaults, self.model_name, self.limits = engine, defaults, model_name, limits
        self.verifier = verifier
        self.index, self.docs_k, self.toolbox = index, docs_k, toolbox or Toolbox()
        self.memory, self.memory_k = memory, memory_k
        self.worker = BatchWorker(engine, max_batch)

    def check_model(self, request: GenerationRequest):
        if request.model not in (None, "", self.model_name):
            raise ApiError(404, f"model {request.model!r} not found: this server serves {self.model_name!r} "
                                f"(GET /v1/models)", "model", "model_not_found")
        if request.n != 1:
            raise ApiError(400, f"n must be 1 (one answer per request), got {request.n}", "n")
        if request.best_of is not None and not 1 <= request.best_of <= self.limits.max_prompts:
            raise ApiError(400, f"best_of must be from 1 to {self.limits.max_prompts} (--max_prompts), got "
                                f"{request.best_of}", "best_of")
        if (request.best_of or 1) > 1 and request.stream:
            raise ApiError(400, "best_of > 1 cannot stream (the answer is chosen once all of them are done): "
                                "set stream to false", "best_of")

    def sampling(self, request: GenerationRequest) -> SamplingParams:
        """The request's settings over the server's defaults, checked."""
        changes = {name: getattr(request, name) for name in SAMPLING_FIELDS if getattr(request, name) is not None}
        # max_tokens is OpenAI's old name; when both are given, the new one wins. `is not None`, not `or`:
        # 0 is a value (a wrong one), not "absent"
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, name)
            if value is not None:
                if not 1 <= value <= self.engine.context:
                    raise ApiError(400, f"{name} must be between 1 and {self.engine.context} (the model's "
                                        f"context), got {value}", name)
                changes["max_new_tokens"] = value
        if request.stop is not None:
            changes["stop"] = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
            if len(changes["stop"]) > self.limits.max_stop:
                raise ApiError(400, f"stop: at most {self.limits.max_stop} stop strings, got "
                                    f"{len(changes['stop'])}", "stop")
        try:
            return self.defaults.replace(**changes).validate()
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split()[0]) from None

    def submit(self, all_ids: list[list[int]], params: SamplingParams, vary_seed: bool = False) -> list[Job]:
        """Queue one job per prompt, all or none: a full queue answers 429 (the openai client retries).
        vary_seed: samples of one prompt (best_of) get seeds seed, seed + 1, ... (one seed would repeat one answer)."""
        if self.worker.queued() + len(all_ids) > self.limits.max_waiting:
            raise ApiError(429, f"server busy, retry later ({self.limits.max_waiting} requests are waiting "
                                f"for the model already)", code="server_busy", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, params.replace(seed=params.seed + i) if vary_seed and params.seed >= 0 else params,
                    min(params.max_new_tokens, self.engine.room(len(ids))), loop) for i, ids in enumerate(all_ids)]
        for job in jobs:
            self.worker.submit(job)
        return jobs

    def chat_ids(self, messages: list, tools: Optional[list] = None) -> list[int]:
        """A conversation, checked, -> prompt ids. Runs in a thread: a long text takes a while to tokenize."""
        try:
            check_messages(messages, where="messages")
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            return self.engine.prompt_ids(messages, tools)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None

    def text_ids(self, prompts: list[str]) -> list[list[int]]:
        """Texts to continue -> prompt ids (in a thread, like chat_ids)."""
        try:
            return [self.engine.text_ids(p) for p in prompts]
        except ValueError as e:
            raise ApiError(400, str(e), "prompt", "context_length_exceeded") from None

    def models(self) -> dict:
        defaults = {name: getattr(self.defaults, name) for name in SAMPLING_FIELDS}
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "llm-workshop",
            # beyond OpenAI's fields, for the web page: what the model is and the server's defaults
            "context_length": self.engine.context, "chat": self.engine.chat, "docs": self.index is not None,
            "memory": self.memory is not None,
            "tools": self.toolbox.schemas(),
            "defaults": {**defaults, "max_tokens": min(self.defaults.max_new_tokens, self.engine.context)}}]}

    async def run_tool(self, request: ToolRunRequest) -> dict:
        """POST /v1/tools/call: run one built-in tool (in a thread: a search may take a moment); its
        errors are its answer ("error: ..."), as the model would see them."""
        if request.name not in self.toolbox.tools:
            raise ApiError(404, f"no tool {request.name!r} on this server; it has {', '.join(self.toolbox.tools) or 'none'} "
                                f"(--tools)", "name")
        content = await asyncio.to_thread(self.toolbox.call, ToolCall(request.name, request.arguments))
        return {"name": request.name, "content": content}

    # --- /v1/chat/completions ---------------------------------------------------------

    def retrieve(self, messages: list) -> tuple[list, list[dict]]:
        """With --docs: the last user message gets the passages found for it -> (messages, sources)."""
        last = len(messages) - 1
        if self.index is None or not isinstance(messages[last], dict) or messages[last].get("role") != "user" \
                or not isinstance(messages[last].get("content"), str):
            return messages, []
        hits = self.index.search(messages[last]["content"], self.docs_k)
        sources = [{"source": h.chunk.cite, "text": h.chunk.text, "score": round(h.score, 3)} for h in hits]
        return messages[:last] + [{**messages[last], "content": with_sources(messages[last]["content"], hits)}], sources

    def recall(self, messages: list) -> tuple[list, list[str]]:
        """With --memory: the persona if there is no system message, and what is recalled for the last
        user message (not already among the messages) added to the system prompt -> (messages, memories)."""
        last = messages[-1] if messages else None
        if self.memory is None or not isinstance(last, dict) or last.get("role") != "user" \
                or not isinstance(last.get("content"), str):
            return messages, []
        shown = {f"{m['role']}: {m['content']}" for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)}
        recalled = [r for r in self.memory.recall(last["content"], self.memory_k + len(shown)) if r.text not in shown]
        recalled = recalled[:self.memory_k]
        has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
        system = system_with_memories(messages[0]["content"] if has_system else self.memory.persona, recalled)
        if system:
            messages = [{"role": "system", "content": system}] + messages[int(has_system):]
        return messages, [r.text for r in recalled]

    def prepare(self, messages: list, tools: Optional[list]) -> tuple[list[int], list[dict], list[str]]:
        """Retrieval, memory, then the prompt ids (in a thread: searching and tokenizing take a while)."""
        messages, sources = self.retrieve(messages) if messages else (messages, [])
        messages, memories = self.recall(messages)
        return self.chat_ids(messages, tools), sources, memories

    def store(self, messages: list, answer: str):
        """With --memory: keep the question and the final answer (not a turn that ends in tool calls)."""
        last = messages[-1] if messages else None
        if self.memory is not None and isinstance(last, dict) and last.get("role") == "user":
            self.memory.add_turn("user", last["content"])
            self.memory.add_turn("assistant", answer)

    async def chat(self, request: ChatRequest, http: Request):
        self.check_model(request)
        messages = [chat_message(m) for m in request.messages]
        tools = offered_tools(request)
        if tools and not self.engine.chat:
            raise ApiError(400, f"{self.model_name} is a text model (no chat template): it cannot be offered tools", "tools")
        params = self.sampling(request)
        # tokenizing in the event loop would stall every other client while a long prompt is encoded
        ids, sources, memories = await asyncio.to_thread(self.prepare, messages, tools)
        best_of = request.best_of or 1
        if best_of > 1 and not self.engine.chat:
            raise ApiError(400, f"{self.model_name} is a text model: best_of compares chat answers", "best_of")
        jobs = self.submit([ids] * best_of, params, vary_seed=True)
        job = jobs[0]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        # beyond OpenAI's fields: what --docs found and what --memory recalled
        extra = {**({"sources": sources} if self.index is not None else {}),
                 **({"memories": memories} if self.memory is not None else {})}
        if request.stream:
            def chunk(delta: dict, finish_reason=None) -> dict:
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            calls = ToolCallStream() if tools else None
            said = []

            def piece(d: Delta) -> list[dict]:
                said.append(d.text)
                text = calls.push(d.text) if calls else d.text
                return [chunk({"content": text})] if text else []

            def finish(d: Delta) -> list[dict]:      # (its text, if any, went through piece first)
                rest, found = calls.finish() if calls else ("", [])
                if not found:
                    self.store(messages, "".join(said))
                if not calls:
                    return [chunk({}, d.finish_reason)]
                out = [chunk({"content": rest})] if rest else []
                out += [chunk({"tool_calls": [{"index": i, **call}]}) for i, call in enumerate(found)]
                return out + [chunk({}, "tool_calls" if found else d.finish_reason)]
            return sse_response(job, {**chunk({"role": "assistant", "content": ""}), **extra}, piece, finish,
                                head, "chat.completion.chunk", include_usage(request))
        results = await answers(jobs, http)
        kept = 0
        if best_of > 1:
            texts = [text for text, _ in results]
            scores = await asyncio.to_thread(score_answers, self.verifier, self.engine.tokenizer, messages, texts) \
                if self.verifier is not None else None
            kept, why = pick_best(texts, scores)
            extra["best_of"] = {"n": best_of, "picked_by": "verifier" if scores else "vote", "why": why,
                                "answers": texts, **({"scores": scores} if scores else {})}
        text, last = results[kept]
        content, tool_calls = split_answer(text) if tools else (text, [])
        if not tool_calls:
            self.store(messages, text)
        message = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
        return {**head, "object": "chat.completion", **extra,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tool_calls else last.finish_reason}],
                "usage": usage(job, *(d for _, d in results))}          # best_of: every answer counts

    # --- /v1/completions ----------------------------------------------------------------

    async def complete(self, request: CompletionRequest, http: Request):
        self.check_model(request)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if (request.best_of or 1) > 1:
            raise ApiError(400, "best_of picks among chat answers (a vote on final answers, or a verifier trained on "
                                "chats): use /v1/chat/completions", "best_of")
        if not prompts or (request.stream and len(prompts) > 1):
            raise ApiError(400, "prompt must be one text (or a non-empty list of texts without streaming)", "prompt")
        if len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"prompt: at most {self.limits.max_prompts} prompts in one request, got "
                                f"{len(prompts)}: send several requests", "prompt")
        params = self.sampling(request)
        all_ids = await asyncio.to_thread(self.text_ids, prompts)       # off the event loop, as in chat
        jobs = self.submit(all_ids, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}

        def choice(i: int, text: str, finish_reason=None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if request.stream:
            def chunk(text: str, finish_reason=None) -> dict:
                return {**head, "object": "text_completion", "choices": [choice(0, text, finish_reason)]}
            return sse_response(jobs[0], None, lambda d: [chunk(d.text)], lambda d: [chunk("", d.finish_reason)],
                                head, "text_completion", include_usage(request))
        results = await answers(jobs, http)
        tokens = sum(last.tokens for _, last in results)
        prompt_tokens = sum(len(ids) for ids in all_ids)
        return {**head, "object": "text_completion",
                "choices": [choice(i, text, last.finish_reason) for i, (text, last) in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                          "total_tokens": prompt_tokens + tokens}}


async def collect(job: Job) -> tuple[str, Delta]:
    """The whole answer of a job and its last delta (finish_reason, token count)."""
    text, last = "", None
    async for delta in deltas_of(job):
        text, last = text + delta.text, delta
    return text, last


async def answers(jobs: list[Job], http: Request) -> list[tuple[str, Delta]]:
    """The whole answers of jobs (collect). Nothing is sent until they are done, so nothing would
    notice a client that hangs up: look every DISCONNECT_POLL_S, and if it has, cancel its jobs
    (their rows stop at the next token; queued ones never start)."""
    together = asyncio.ensure_future(asyncio.gather(*(collect(job) for job in jobs)))
    while not together.done():
        await asyncio.wait([together], timeout=DISCONNECT_POLL_S)
        if not together.done() and await http.is_disconnected():
            together.cancel()              # collect -> deltas_of's `finally` marks each job cancelled
            for job in jobs:
                job.cancelled = True
            raise ApiError(499, "the client closed the connection")   # nginx's code; nobody reads it
    return together.result()


def usage(job: Job, *lasts: Delta) -> dict:
    """Token counts of one prompt and its answers (each answer's last delta carries its count)."""
    completion = sum(last.tokens for last in lasts)
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion, "total_tokens": len(job.ids) + completion}


def include_usage(request: GenerationRequest) -> bool:
    return bool((request.stream_options or {}).get("include_usage"))


def sse_response(job: Job, first: Optional[dict], piece, finish, head: dict, kind: str, with_usage: bool):
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`.
    first: an opening chunk (chat sends the role); piece(delta) / finish(delta) build the others
    (a list each: with tools, a piece of text may be held back, and the end brings the calls)."""

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events():
        if first is not None:
            yield event(first)
        try:
            async for delta in deltas_of(job):
                if delta.text:
                    for chunk in piece(delta):
                        yield event(chunk)
                if delta.finish_reason:
                    for chunk in finish(delta):
                        yield event(chunk)
                    if with_usage:
                        yield event({**head, "object": kind, "choices": [], "usage": usage(job, delta)})
        except ApiError as e:
            yield event({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------
# The app


class BodyLimit:
    """ASGI middleware: read a request's body up to max_bytes, and answer 413 past it, before the
    app parses it (FastAPI would read any size into memory). A body declared too long by its
    Content-Length is refused without reading it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")     # absent when sent in chunks
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        body, more = b"", not too_large
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            too_large = len(body) > self.max_bytes
            more = message.get("more_body", False) and not too_large
        if too_large:
            response = ApiError(413, f"request body too large: the limit is {self.max_bytes} bytes "
                                     f"(--max_body_bytes)", code="request_too_large").response()
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            """The body read above, then the client's later messages (a disconnect)."""
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


def create_app(engine: Engine, defaults: SamplingParams, model_name: str, max_batch: int = 16,
               limits: Optional[Limits] = None, index: Optional[Index] = None, docs_k: int = 3,
               toolbox: Optional[Toolbox] = None, memory: Optional[Memory] = None, memory_k: int = 3,
               verifier=None) -> FastAPI:
    """The FastAPI application: routes, error handlers, and a worker thread for the engine.
    index: documents searched for every chat question (--docs); toolbox: tools run at /v1/tools/call;
    memory: long-term memory recalled into and stored from every chat (--memory); verifier: scores
    best_of answers (scoring.RewardModel, --verifier)."""
    limits = limits or Limits()
    api = Api(engine, defaults, model_name, max_batch, limits, index, docs_k, toolbox, memory, memory_k, verifier)
    app = FastAPI(title="LLM workshop", docs_url=None, redoc_url=None)   # the docs pages would need a CDN
    app.state.api = api
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return ApiError(400, f"the request body is not valid JSON ({reason}): send a JSON object").response()
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return ApiError(400, f"{where}: {first['msg']}", where).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += " (the API lives under /v1: /v1/models, /v1/chat/completions, /v1/completions)"
        return ApiError(e.status_code, message).response()

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        # a bug, not a bad request: the client gets no internals; Starlette re-raises the exception
        # after this answer, so uvicorn logs its traceback
        return ApiError(500, INTERNAL_ERROR).response()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.complete(body, request)

    @app.post("/v1/tools/call")
    async def tool_call(body: ToolRunRequest):
        return await api.run_tool(body)

    return app


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear line if the address cannot be used (port 0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port, "
                         f"or stop what is using it") from None
    return sock


def make_server(app: FastAPI, log_level: str = "info") -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1))


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve app from a background thread (tests, notebooks): yields the base URL, stops on exit."""
    sock = open_socket(host, port)
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def main(argv=None):
    cfg = parse_config(ServeConfig, __doc__.split("\n\n")[0].strip(), argv)
    defaults = SamplingParams.of(cfg)
    if cfg.max_batch < 1:
        raise ValueError(f"--max_batch must be at least 1, got {cfg.max_batch}")
    cfg.check()
    for name in ("docs_k", "memory_k"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    index = Index.from_folder(cfg.docs) if cfg.docs else None
    memory = Memory(cfg.memory) if cfg.memory else None
    toolbox = builtin_toolbox([t.strip() for t in cfg.tools.split(",") if t.strip()], index, memory)
    engine = Engine.load(cfg)
    if (index is not None or memory is not None or len(toolbox)) and not engine.chat:
        raise ValueError("--docs, --memory and --tools need a chat model (they go into the chat prompt): "
                         "use a chat checkpoint")
    verifier = verifier_for(cfg.verifier, engine) if cfg.verifier else None
    name = cfg.model_name or engine.name
    sock = open_socket(cfg.host, cfg.port)
    app = create_app(engine, defaults, name, cfg.max_batch, limits=cfg, index=index, docs_k=cfg.docs_k,  # a ServeConfig
                     toolbox=toolbox, memory=memory, memory_k=cfg.memory_k, verifier=verifier)          # is a Limits
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {cfg.host}: anyone who can reach this machine can use the model")
    url = f"http://{'localhost' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{sock.getsockname()[1]}"
    print(f"{engine.model.summary()}\nserving {name!r} ({'chat' if engine.chat else 'text continuation'}): "
          f"chat page {url}/   API {url}/v1   (Ctrl-C stops)")
    make_server(app).run(sockets=[sock])


if __name__ == "__main__":
    main_guard(main)
