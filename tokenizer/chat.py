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

ChatML is the only template here. An imported model that brings a template of another kind
(Llama-3's <|start_header_id|>...<|eot_id|>) was trained on that one, not on this: its
tokenizer refuses to give <|im_start|>/<|im_end|>, so render_chat stops with one line saying
what to do (tokenizer/hf.py's chat_refusal) instead of prompting it wrongly.
"""

from __future__ import annotations

from typing import Sequence

ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[dict], where: str = "conversation") -> None:
    """Raise ValueError (one line: which message, what is wrong) unless messages is a list of
    {"role": one of ROLES, "content": str}."""
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
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({role}) has no text \"content\"")


def render_chat(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False,
                where: str = "conversation") -> tuple[list[int], list[int]]:
    """Messages -> (ids, answer_mask), two lists of the same length.

    answer_mask[i] = 1 where ids[i] is a token the model is trained to produce (assistant
    content and its <|im_end|>), else 0. add_generation_prompt=True appends
    "<|im_start|>assistant\\n" (mask 0): the point where the model starts its answer.
    A tokenizer with a default_system_prompt (imported from Qwen2.5, whose template adds one)
    gets that system message first when the conversation has none, as the model was trained.
    """
    check_messages(messages, where)
    default_system = getattr(tokenizer, "default_system_prompt", None)   # Qwen2.5's template adds one
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    newline = tokenizer.encode_ordinary("\n")
    ids, mask = [], []

    def add(tokens: list[int], learn: bool):
        ids.extend(tokens)
        mask.extend([int(learn)] * len(tokens))

    for message in messages:
        is_answer = message["role"] == "assistant"
        add([tokenizer.im_start_id] + tokenizer.encode_ordinary(message["role"]) + newline, False)
        add(tokenizer.encode_ordinary(message["content"]), is_answer)
        add([tokenizer.im_end_id], is_answer)
        add(newline, False)
    if add_generation_prompt:
        add([tokenizer.im_start_id] + tokenizer.encode_ordinary("assistant") + newline, False)
    return ids, mask


def chat_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The same rendering as text, for reading and printing (special tokens spelled out)."""
    check_messages(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
