"""
agent.py -- the agent loop: the model answers, or calls a tool and reads its result, until it answers.

    toolbox = builtin_toolbox(["calculator"])
    result = run_agent(engine_answerer(engine, params), [{"role": "user", "content": "What is 37*91?"}], toolbox)
    result.answer       # "37*91 = 3367."
    result.messages     # user, assistant (tool call), tool ("3367"), assistant (the answer)

    python inference.py --ckpt smollm2 --tools calculator     # the REPL as an agent

One step (the ReAct pattern, in the chat format of tokenizer/chat.py):

    1. the conversation, with the tools' schemas in the system prompt, goes to the model
    2. its answer is read for <tool_call> blocks (tokenizer.chat.parse_tool_calls)
    3. no call: that is the answer, done.  Calls: each is run (tools.Toolbox.call), its result
       (or its error, as text) is appended as a tool message, and back to 1

`max_steps` bounds the loop: a model that keeps calling tools is stopped, and says so. The
model is anything with answer(messages, tools) -> text: `engine_answerer` wraps the engine
(streaming the text to a callback as it comes), and the tests use a scripted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from engine import Engine, SamplingParams
from tokenizer.chat import parse_tool_calls
from tools import Toolbox

Answerer = Callable[[list[dict], Sequence[dict]], str]    # (messages, tool schemas) -> the model's text


@dataclass
class AgentResult:
    answer: str                        # the final answer's text ("" if the step limit ended the loop)
    messages: list[dict]               # the conversation given, plus every message the loop added
    steps: int                         # how many times the model was asked
    stopped: bool = False              # True: max_steps ended the loop before an answer
    calls: list[tuple[str, dict, str]] = field(default_factory=list)    # (tool, arguments, result) in order


def run_agent(answer: Answerer, messages: Sequence[dict], toolbox: Toolbox, max_steps: int = 5,
              on_event: Optional[Callable[[str, dict], None]] = None) -> AgentResult:
    """Run the loop above on a conversation (not changed: the result has a copy, extended).

    on_event(kind, data) is told of every "tool_call" ({"name", "arguments"}) and "tool_result"
    ({"name", "content"}) as they happen (the REPL prints them, the web page shows them)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    messages, calls = list(messages), []
    tell = on_event or (lambda kind, data: None)
    for step in range(1, max_steps + 1):
        text = answer(messages, toolbox.schemas())
        content, found = parse_tool_calls(text)
        if not found:
            messages.append({"role": "assistant", "content": text.strip()})
            return AgentResult(text.strip(), messages, step, calls=calls)
        if all(not call.error for call in found):    # re-rendered in the template's own form
            messages.append({"role": "assistant", "content": content,
                             "tool_calls": [call.message_entry() for call in found]})
        else:                                        # a broken call stays as written, so the error makes sense
            messages.append({"role": "assistant", "content": text.strip()})
        for call in found:
            tell("tool_call", {"name": call.name, "arguments": call.arguments, "error": call.error})
            result = toolbox.call(call)
            tell("tool_result", {"name": call.name, "content": result})
            calls.append((call.name, call.arguments, result))
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
    return AgentResult("", messages, max_steps, stopped=True, calls=calls)


def engine_answerer(engine: Engine, params: SamplingParams, on_text: Optional[Callable[[str], None]] = None,
                    generator=None, offer_schemas: bool = True) -> Answerer:
    """The engine as an Answerer: the conversation rendered with the tools (Engine.chat_ids), one
    answer streamed; on_text(piece) sees the text as it comes. offer_schemas=False leaves the tools'
    schemas out of the prompt, for a small model fine-tuned to call its tools without them
    (data/tool_data.py --no_schema): its calls still run."""
    if not engine.chat:
        raise ValueError("tools need a chat model (the chat template carries the calls): use a chat "
                         "checkpoint, or --chat on")

    def answer(messages: list[dict], tools: Sequence[dict]) -> str:
        ids = engine.chat_ids(messages, tools=tools if offer_schemas else None)
        text = ""
        for delta in engine.stream([ids], params, generator=generator):
            text += delta.text
            if on_text and delta.text:
                on_text(delta.text)
        return text
    return answer
