"""
The chat template: a conversation -> token ids + an answer mask (ChatML, as Qwen uses).

Every message becomes

    <|im_start|>{role}\\n{content}<|im_end|>\\n

with <|im_start|> and <|im_end|> as single special tokens. For example

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nWhat is 2+3?<|im_end|>\\n
    <|im_start|>assistant\\n5<|im_end|>\\n

The answer mask says which tokens are the assistant's, the ones SFT teaches the model to
produce: the content of assistant messages and the <|im_end|> that closes them (so it
learns to stop). The
role headers, the system prompt and the user's words are context only. SFT, DPO and
inference all render conversations with `render_chat`, so they agree token for token.

Text inside a message is always ordinary text: a user who types "<|im_end|>" gets
those characters, never the control token.

Tools (Qwen2.5 / Hermes convention, so imported models that learned it understand it):

    tools offered    the system message gets a "# Tools" section listing each tool's JSON
                     schema (OpenAI's {"type": "function", "function": {name, description,
                     parameters}}) inside <tools></tools>, and how to call one
    a tool call      an assistant message with "tool_calls": each call is written, after the
                     message's text if any, as
                         <tool_call>\\n{"name": "calculator", "arguments": {"expression": "2+3"}}\\n</tool_call>
                     learned like any answer: the model is taught to emit calls
    a tool result    a message {"role": "tool", "content": "5"}: rendered inside a *user* turn
                     as <tool_response>\\n5\\n</tool_response> (several results in a row share
                     one user turn), never learned: the tool wrote it, not the model

A tool call is text the model writes; `parse_tool_calls` finds the calls in an answer.
Because calls and results are plain text in the turn, a conversation that spells them out
in "content" (an assistant message "<tool_call>...</tool_call>", a user message
"<tool_response>...</tool_response>") renders to the same tokens: that is how
data/tool_data.py writes training data any chat jsonl reader accepts.

ChatML is the only template here. An imported model that brings a template of another kind
(Llama-3's <|start_header_id|>...<|eot_id|>) was trained on that one, not on this: its
tokenizer refuses to give <|im_start|>/<|im_end|>, so render_chat stops with one line saying
what to do (tokenizer/hf.py's chat_refusal) instead of prompting it wrongly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


# ----------------------------------------------------------------------------------
# Checking messages


def call_parts(call, where: str = "tool call") -> tuple[str, dict]:
    """One entry of an assistant message's "tool_calls" -> (name, arguments dict).

    Accepts OpenAI's {"type": "function", "function": {"name", "arguments": JSON text}} and the
    plain {"name", "arguments": {...}}; anything else is a ValueError saying what is wrong."""
    inner = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"]:
        raise ValueError(f'{where}: expected {{"name": ..., "arguments": {{...}}}} (or OpenAI\'s '
                         f'{{"type": "function", "function": {{...}}}}), got {str(call)[:80]}')
    arguments = inner.get("arguments", {})
    if isinstance(arguments, str):              # OpenAI sends the arguments as JSON text
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} ({inner['name']}): arguments are not valid JSON ({e.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where} ({inner['name']}): arguments must be a JSON object, got {type(arguments).__name__}")
    return inner["name"], arguments


def check_messages(messages: Sequence[dict], where: str = "conversation") -> None:
    """Raise ValueError (one line: which message, what is wrong) unless messages is a list of
    {"role": one of ROLES, "content": str}. An assistant message with "tool_calls" may have
    empty (null) content."""
    if not isinstance(messages, (list, tuple)) or not messages:
        got = "an empty list" if isinstance(messages, (list, tuple)) else f"a {type(messages).__name__}"
        raise ValueError(f"{where}: expected a non-empty list of messages, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} is a {type(message).__name__}, "
                             f'expected {{"role": ..., "content": ...}}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f'{where}: message {i} ({role}): "tool_calls" must be a list, in an assistant message')
            for j, call in enumerate(calls):
                call_parts(call, f"{where}: message {i} tool call {j}")
        if not isinstance(content, str) and not (calls and content is None):
            raise ValueError(f"{where}: message {i} ({role}) has no text \"content\"")


# ----------------------------------------------------------------------------------
# Rendering


def tool_call_text(name: str, arguments: dict) -> str:
    """One call as the model writes it: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tool_response_text(content: str) -> str:
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


def tools_system_text(system: str, tools: Sequence[dict]) -> str:
    """The system prompt with the tools offered: system + "# Tools" + one JSON schema per line."""
    schemas = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (f"{system}\n\n" if system else "") + TOOLS_HEADER + schemas + TOOLS_FOOTER


def chat_turns(messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
               default_system: Optional[str] = None) -> list[tuple[str, str, bool]]:
    """Messages -> turns (role header, text, learned). The one place that decides what a
    conversation looks like: render_chat and chat_text both use it.

    The system prompt gets the tools (if any); a run of tool messages becomes one user turn of
    <tool_response> blocks; an assistant's tool calls follow its text, one block each."""
    messages = list(messages)
    has_system = messages[0]["role"] == "system"
    system = messages[0]["content"] if has_system else (default_system or "")
    if has_system or default_system or tools:
        first = {"role": "system", "content": tools_system_text(system, tools) if tools else system}
        messages = [first] + messages[int(has_system):]
    turns, previous = [], None
    for message in messages:
        role, text = message["role"], message.get("content") or ""
        if role == "tool":
            block = tool_response_text(text)
            if previous == "tool":                   # results in a row share one user turn
                turns[-1] = ("user", turns[-1][1] + "\n" + block, False)
            else:
                turns.append(("user", block, False))
        else:
            for call in message.get("tool_calls") or []:          # only assistants have them (checked)
                text += ("\n" if text else "") + tool_call_text(*call_parts(call))
            turns.append((role, text, role == "assistant"))
        previous = role
    return turns


def render_chat(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False,
                where: str = "conversation", tools: Optional[Sequence[dict]] = None) -> tuple[list[int], list[int]]:
    """Messages -> (ids, answer_mask), two lists of the same length.

    answer_mask[i] = 1 where ids[i] is a token the model is trained to produce (assistant
    content, its tool calls and its <|im_end|>), else 0. add_generation_prompt=True appends
    "<|im_start|>assistant\\n" (mask 0): the point where the model starts its answer.
    tools: JSON schemas offered to the model (in the system prompt, see the top of this file).
    A tokenizer with a default_system_prompt (imported from Qwen2.5, whose template adds one)
    gets that system message first when the conversation has none, as the model was trained.
    """
    check_messages(messages, where)
    default_system = getattr(tokenizer, "default_system_prompt", None)   # Qwen2.5's template adds one
    newline = tokenizer.encode_ordinary("\n")
    ids, mask = [], []

    def add(tokens: list[int], learn: bool):
        ids.extend(tokens)
        mask.extend([int(learn)] * len(tokens))

    for role, text, is_answer in chat_turns(messages, tools, default_system):
        add([tokenizer.im_start_id] + tokenizer.encode_ordinary(role) + newline, False)
        add(tokenizer.encode_ordinary(text), is_answer)
        add([tokenizer.im_end_id], is_answer)
        add(newline, False)
    if add_generation_prompt:
        add([tokenizer.im_start_id] + tokenizer.encode_ordinary("assistant") + newline, False)
    return ids, mask


def chat_text(messages: Sequence[dict], add_generation_prompt: bool = False,
              tools: Optional[Sequence[dict]] = None) -> str:
    """The same rendering as text, for reading and printing (special tokens spelled out)."""
    check_messages(messages)
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content, _ in chat_turns(messages, tools))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------
# Reading tool calls out of generated text


@dataclass
class ToolCall:
    """A call found in an answer. error is set when the block could not be read (bad JSON, no
    name): the agent answers such a call with the error, so the model can try again."""
    name: str
    arguments: dict = field(default_factory=dict)
    error: str = ""
    id: str = ""

    def message_entry(self) -> dict:
        """The call as OpenAI writes it in an assistant message's "tool_calls"."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Generated text -> (the text outside the calls, stripped; the calls in order).

    A block runs from <tool_call> to </tool_call> (or to the end, if the answer stopped
    before closing it). Its body must be JSON {"name": str, "arguments": object}; the
    arguments may also be JSON text, as OpenAI writes them. A block that is not gives a
    ToolCall with .error saying why. A block may also hold a JSON list of calls (SmolLM2 writes
    <tool_call>[{"name": ..., "arguments": ...}]</tool_call>)."""
    calls = []
    for match in CALL_BLOCK.finditer(text):
        try:
            body = json.loads(match.group(1).strip())
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", error=f"the tool call is not valid JSON ({e.msg}): write "
                                            f'{{"name": ..., "arguments": {{...}}}}', id=f"call_{len(calls)}"))
            continue
        for entry in body if isinstance(body, list) and body else [body]:
            try:
                name, arguments = call_parts(entry)
                calls.append(ToolCall(name, arguments, id=f"call_{len(calls)}"))
            except ValueError as e:
                calls.append(ToolCall("", error=str(e), id=f"call_{len(calls)}"))
    return CALL_BLOCK.sub("", text).strip(), calls
