"""
tools.py -- what the model can call: a calculator, document search, memory, and any MCP server's tools.

    toolbox = Toolbox([calculator_tool(), search_tool(index), recall_tool(memory)])
    toolbox.schemas()                     # the JSON schemas offered to the model (tokenizer/chat.py)
    toolbox.call(ToolCall("calculator", {"expression": "12*(3+4)"}))   # -> "84"

A `Tool` is a name, a description, a JSON schema of its arguments and a function that
returns text. The model only ever sees text: its call is a JSON object it wrote
(tokenizer/chat.py parses it), and the result, or the error, goes back as a tool message.
`Toolbox.call` never raises: an unknown tool, a missing argument or a failing tool becomes
"error: ..." for the model to read and do better (agent.py runs the loop).

The calculator is a small parser written here, never `eval`: eval would run any Python the
model (or whoever wrote the prompt) put in the expression.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from tokenizer.chat import ToolCall

# ----------------------------------------------------------------------------------
# The calculator: tokens -> recursive descent -> a number
#
#   expression := term (("+" | "-") term)*
#   term       := unary (("*" | "/" | "//" | "%") unary)*
#   unary      := ("+" | "-") unary | power
#   power      := atom (("**" | "^") unary)?          right-associative: 2**3**2 = 2**9
#   atom       := NUMBER | NAME | NAME "(" expression ("," expression)* ")" | "(" expression ")"
#
# -2**2 is -4, as in Python and on paper. Integers stay exact (Python's big ints), so
# 123456789 * 987654321 is right to the last digit; "/" gives a float unless it divides.

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_DIGITS = 1000                  # 9**9**9 would take minutes and gigabytes: refused up front
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {"sqrt": (math.sqrt, 1), "abs": (abs, 1), "round": (round, 1), "floor": (math.floor, 1),
             "ceil": (math.ceil, 1), "log": (math.log, 1), "log10": (math.log10, 1), "exp": (math.exp, 1),
             "sin": (math.sin, 1), "cos": (math.cos, 1), "tan": (math.tan, 1), "min": (min, 2), "max": (max, 2)}
TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_]\w*)|(\*\*|//|[-+*/%^(),]))")


class CalculatorError(ValueError):
    pass


def calculator_tokens(expression: str) -> list[tuple[str, str, int]]:
    """"2*(3+x)" -> [("number", "2", 0), ("op", "*", 1), ...]: (kind, text, position)."""
    expression = expression.replace("×", "*").replace("÷", "/").replace("，", ",")
    tokens, position = [], 0
    while position < len(expression):
        if expression[position:].strip() == "":
            break
        match = TOKEN.match(expression, position)
        if not match:
            bad = expression[position:].lstrip()[0]
            raise CalculatorError(f"unexpected {bad!r} at position {expression.index(bad, position)}: "
                                  f"use numbers, + - * / // % ** ( ) and {', '.join(FUNCTIONS)}")
        number, name, op = match.groups()
        kind, text = ("number", number) if number else ("name", name) if name else ("op", op)
        tokens.append((kind, text, match.start(match.lastindex)))
        position = match.end()
    return tokens


class Parser:
    """Recursive descent over the tokens: one method per line of the grammar above."""

    def __init__(self, tokens: list[tuple[str, str, int]]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else ""

    def take(self) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            raise CalculatorError("the expression ends too early (a number or ')' is missing)")
        self.i += 1
        return self.tokens[self.i - 1]

    def expect(self, text: str):
        kind, got, position = self.take()
        if got != text:
            raise CalculatorError(f"expected {text!r} at position {position}, found {got!r}")

    def expression(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take()[1] == "+" else value - self.term()
        return value

    def term(self):
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()[1]
            right = self.unary()
            if op != "*" and right == 0:
                raise CalculatorError("division by zero")
            if op == "*":
                value = value * right
            elif op == "/":       # exact when it divides: 10/2 is 5, not 5.0
                value = value // right if isinstance(value, int) and isinstance(right, int) and value % right == 0 \
                    else value / right
            else:
                value = value // right if op == "//" else value % right
        return value

    def unary(self):
        if self.peek() in ("+", "-"):
            sign = -1 if self.take()[1] == "-" else 1
            return sign * self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() in ("**", "^"):
            self.take()
            exponent = self.unary()
            if abs(base) > 1 and abs(exponent) * math.log10(abs(base)) > MAX_RESULT_DIGITS:
                raise CalculatorError(f"the result would have more than {MAX_RESULT_DIGITS} digits")
            if base == 0 and exponent < 0:
                raise CalculatorError("division by zero (0 to a negative power)")
            return base ** exponent
        return base

    def atom(self):
        kind, text, position = self.take()
        if kind == "number":
            return int(text) if text.isdigit() else float(text)
        if text == "(":
            value = self.expression()
            self.expect(")")
            return value
        if kind == "name" and text in FUNCTIONS:
            function, most = FUNCTIONS[text]
            self.expect("(")
            args = [self.expression()]
            while self.peek() == ",":
                self.take()
                args.append(self.expression())
            self.expect(")")
            if (most == 1 and len(args) != 1) or len(args) < most:
                raise CalculatorError(f"{text}() takes {'one argument' if most == 1 else 'two or more'}, got {len(args)}")
            try:
                return function(*args)
            except (ValueError, OverflowError, TypeError) as e:
                raise CalculatorError(f"{text}({', '.join(map(str, args))}): {e}") from None
        if kind == "name" and text in CONSTANTS:
            return CONSTANTS[text]
        if kind == "name":
            raise CalculatorError(f"unknown name {text!r} at position {position}: known are "
                                  f"{', '.join(CONSTANTS)} and the functions {', '.join(FUNCTIONS)}")
        raise CalculatorError(f"unexpected {text!r} at position {position}")


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely; CalculatorError (one line) if it is not one."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    parser = Parser(calculator_tokens(expression))
    try:
        value = parser.expression()
    except OverflowError:
        raise CalculatorError("the result is too large for a float") from None
    if parser.i < len(parser.tokens):
        _, text, position = parser.tokens[parser.i]
        raise CalculatorError(f"unexpected {text!r} at position {position}")
    return value


def format_number(value: int | float) -> str:
    """12 -> "12"; 0.1 + 0.2 -> "0.3" (12 significant digits hide float noise); 5.0 -> "5"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


# ----------------------------------------------------------------------------------
# Tools and the toolbox


@dataclass
class Tool:
    """A function the model may call. parameters: the JSON schema of its keyword arguments."""
    name: str
    description: str
    parameters: dict
    run: Callable[..., str]

    def schema(self) -> dict:
        """As OpenAI (and the chat template) offer it to the model."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def check_arguments(tool: Tool, arguments: dict) -> None:
    """ValueError unless the arguments fit the tool's schema: required ones present, no unknown
    ones, simple types right (a small model's calls are often slightly wrong: say how)."""
    properties = tool.parameters.get("properties", {})
    missing = [name for name in tool.parameters.get("required", []) if name not in arguments]
    unknown = [name for name in arguments if name not in properties]
    if missing or unknown:
        raise ValueError(f"{tool.name} takes {', '.join(properties) or 'no arguments'}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    for name, value in arguments.items():
        expected = JSON_TYPES.get(properties[name].get("type"))
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)):
            raise ValueError(f"{tool.name}: {name} must be a {properties[name]['type']}, got {value!r}")


class Toolbox:
    """Tools by name: their schemas for the prompt, and calls that always answer with text."""

    def __init__(self, tools: Sequence[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool):
        if tool.name in self.tools:
            raise ValueError(f"two tools are called {tool.name!r}: give one another name")
        self.tools[tool.name] = tool

    def __len__(self) -> int:
        return len(self.tools)

    def schemas(self) -> list[dict]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, call: ToolCall) -> str:
        """Run one call; whatever goes wrong comes back as "error: ..." text for the model."""
        if call.error:
            return f"error: {call.error}"
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: there is no tool {call.name!r}; the tools are {', '.join(self.tools) or 'none'}"
        try:
            check_arguments(tool, call.arguments)
            return str(tool.run(**call.arguments))
        except Exception as e:   # a tool's failure is the model's information, not the program's end
            return f"error: {e}"


# ----------------------------------------------------------------------------------
# The built-in tools


CALCULATOR_SCHEMA = {"type": "object",
                     "properties": {"expression": {"type": "string",
                                                   "description": "arithmetic, e.g. 12*(3+4) or sqrt(2)/2"}},
                     "required": ["expression"]}


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression exactly and return the number.",
                CALCULATOR_SCHEMA, lambda expression: format_number(calculate(expression)))


def search_tool(index, k: int = 3) -> Tool:
    """Search the documents of a retrieval.Index: the best passages with their [source#chunk]."""
    def search_documents(query: str) -> str:
        hits = index.search(query, k)
        return "\n".join(f"[{h.chunk.cite}] {h.chunk.text}" for h in hits) or "no passage matches"
    return Tool("search_documents", "Search the user's documents; returns passages with their sources.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                 "required": ["query"]}, search_documents)


def memory_tools(memory, k: int = 3) -> list[Tool]:
    """recall_memory (search what memory.Memory kept from earlier conversations) and remember (keep a note)."""
    def recall_memory(query: str) -> str:
        found = memory.recall(query, k)
        return "\n".join(f"- {item.text}" for item in found) or "nothing remembered about that"

    def remember(text: str) -> str:
        memory.remember(text)
        return "remembered"
    text_arg = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    return [Tool("recall_memory", "Search what you remember from earlier conversations with this user.",
                 text_arg, recall_memory),
            Tool("remember", "Keep a note for later conversations.",
                 {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}, remember)]


BUILTIN = ("calculator", "search", "memory")


def builtin_toolbox(names: Sequence[str], index=None, memory=None) -> Toolbox:
    """The tools named (from BUILTIN); search needs an index (--docs), memory a Memory (--memory)."""
    toolbox = Toolbox()
    for name in names:
        if name == "calculator":
            toolbox.add(calculator_tool())
        elif name == "search":
            if index is None:
                raise ValueError("--tools search needs documents to search: add --docs FOLDER")
            toolbox.add(search_tool(index))
        elif name == "memory":
            if memory is None:
                raise ValueError("--tools memory needs a memory database: add --memory FILE.db")
            for tool in memory_tools(memory):
                toolbox.add(tool)
        else:
            raise ValueError(f"unknown tool {name!r}: the built-in tools are {', '.join(BUILTIN)}")
    return toolbox


# ----------------------------------------------------------------------------------
# Tools from an MCP server (the client side; mcp_server.py is the server side)


@contextmanager
def mcp_tools(command: Sequence[str], timeout: float = 60) -> Iterator[list[Tool]]:
    """Start an MCP server (command: the program and its arguments, spoken to over stdio), and
    yield its tools as Tools whose run() calls the server; the server stops when the block ends.

    The agent loop is plain blocking code and the mcp client is asyncio (anyio), which wants the
    client opened and closed by one task: so one task on a thread of its own holds the client
    for the whole block and serves the calls put in its queue, each answered through a Future."""
    from mcp import Client, StdioServerParameters     # an optional dependency: imported when used

    ready: Future = Future()                          # -> (event loop, request queue, listed tools)

    async def hold_client():
        requests: asyncio.Queue = asyncio.Queue()
        try:
            async with Client(StdioServerParameters(command=command[0], args=list(command[1:]))) as client:
                ready.set_result((asyncio.get_running_loop(), requests, (await client.list_tools()).tools))
                while (request := await requests.get()) is not None:
                    name, arguments, reply = request
                    try:
                        reply.set_result(await client.call_tool(name, arguments))
                    except Exception as e:
                        reply.set_exception(e)
        except BaseException as e:   # the server did not start (or died): tell whoever waits
            if not ready.done():
                ready.set_exception(e)

    thread = threading.Thread(target=asyncio.run, args=(hold_client(),), name="mcp-client", daemon=True)
    thread.start()
    try:
        loop, requests, listed = ready.result(timeout)
    except Exception as e:
        raise ValueError(f"could not start the MCP server {' '.join(command)!r} ({type(e).__name__}: {e})") from None

    def remote(name: str):
        def run(**arguments) -> str:
            reply: Future = Future()
            loop.call_soon_threadsafe(requests.put_nowait, (name, arguments, reply))
            result = reply.result(timeout)
            text = "\n".join(getattr(part, "text", "") for part in result.content)
            if result.is_error:
                raise RuntimeError(text)
            return text
        return run
    try:
        yield [Tool(t.name, t.description or "", t.input_schema, remote(t.name)) for t in listed]
    finally:
        try:
            loop.call_soon_threadsafe(requests.put_nowait, None)      # ends the task: the client closes, the server stops
        except RuntimeError:                                          # its loop is already closed: the server died
            pass
        thread.join(timeout=10)
