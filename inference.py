"""
inference.py -- talk to a trained model.

    python inference.py                                   # REPL: each line you type is continued (weight/pretrain)
    python inference.py --ckpt weight/sft                 # chat: the template, multi-turn history, /help
    python inference.py --ckpt weight/sft --prompt "Who are you?"      # one answer, streamed
    python inference.py --lora weight/lora                # a LoRA adapter on top of its base model
    python inference.py --temperature 0 --stats           # greedy; tokens/s after each answer
    printf 'hello\\n{"prompt": "ROMEO:"}\\n' | python inference.py --jsonl   # one JSON answer per line
    python serve.py --ckpt weight/sft                     # the same engine as an HTTP API and a web page
    python inference.py --ckpt smollm2 --docs notes/      # answers from your documents, with sources (retrieval.py)
    python inference.py --ckpt smollm2 --tools calculator # an agent: the model may call tools (agent.py, tools.py)
    python inference.py --ckpt smollm2 --memory me.db     # remembers across restarts; /remember, /forget (memory.py)
    python inference.py --ckpt smollm2 --mcp "python mcp_server.py --docs notes/"   # tools of any MCP server
    python inference.py --ckpt weight/sft_cot --best_of 8 # self-consistency: 8 sampled answers, the majority wins
    python inference.py --best_of 8 --verifier weight/verifier   # best-of-8: the vote weighed by verifier.py

Generation (engine.py, model.py): the prompt goes through the model once (prefill,
filling a KV cache sized for prompt + answer), then one token per step, each step
reusing the cached keys and values. Text is printed as it comes; a UTF-8 character
split over two tokens (common in Chinese) is held back until it is complete.

Chat models (made by full_sft.py, lora.py, dpo.py) get the conversation rendered with
the chat template (tokenizer/chat.py) and answer until <|im_end|>; the REPL keeps the
history, and when it outgrows the context the oldest turns are dropped (the system
prompt stays). Text models (pretrain.py) continue what you type.

Retrieval, tools and memory (chat models): --docs puts the best passages of a folder before
each question (the history keeps the plain question); --tools runs the agent loop, printing
each call and its result; --memory keeps every turn in a SQLite file, and the old turns
that no longer fit the context (and /remember'd notes) come back into the system prompt
when a message shares their rare words. The system prompt is kept there too: the persona
survives a restart.

--best_of N (inference-time scaling): N answers are sampled together as one batch (temperature 0.7
when --temperature is 0) and one is kept by self-consistency (Wang et al. 2022): the first answer
reaching the final answer most of them reach (the text after "Answer:" for a chain-of-thought
model, data/cot.py); with --verifier each answer's vote weighs how sure the verifier is that it
is right (sigmoid of its score), and of the winners the highest-scored one is kept. The REPL shows
the kept answer and why. It buys accuracy with N times the compute: evaluation.py --samples and
verifier.py --best_of measure how much.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from agent import engine_answerer, run_agent
from atomic import atomic_write_text
from engine import Engine, LoadConfig, SamplingParams, unescape
from flags import arg, main_guard, parse_config
from memory import Memory, system_with_memories
from retrieval import Index, with_sources
from scoring import pick_best, score_answers, verifier_for
from tokenizer.chat import check_messages
from tools import BUILTIN, builtin_toolbox, mcp_tools

SAMPLING_NAMES = [f.name for f in dataclasses.fields(SamplingParams)]


@dataclass
class InferenceConfig(LoadConfig):
    prompt: str = arg("", "answer (chat) or continue (text) this once, then exit; empty opens the REPL")
    system: str = arg("", "system prompt for chat mode")
    jsonl: bool = arg(False, "read prompts from stdin, one per line (text, or JSON {\"prompt\": ...} / "
                             "{\"messages\": [...]}), and write one JSON answer per line")
    batch_size: int = arg(8, "with --jsonl: prompts generated together as one batch")
    stats: bool = arg(False, "print tokens/s and time to first token after each answer")
    kv_cache: bool = arg(True, "reuse keys/values of past tokens; --no-kv_cache recomputes the whole "
                               "context each step (slow; for comparison)")
    docs: str = arg("", "a folder of .txt/.md files: the best passages go into each question's prompt, cited")
    docs_k: int = arg(3, "with --docs: how many passages")
    tools: str = arg("", f"comma-separated tools the model may call ({', '.join(BUILTIN)}): runs the agent loop")
    max_tool_steps: int = arg(5, "with --tools: most model calls for one answer")
    tool_schemas: bool = arg(True, "with --tools: list the tools' JSON schemas in the system prompt; --no-tool_schemas "
                                   "for a model fine-tuned without them (data/tool_data.py --no_schema)")
    memory: str = arg("", "a SQLite file of long-term memory (made if missing): turns, /remember notes, persona")
    memory_k: int = arg(3, "with --memory: most remembered items put back into the prompt")
    mcp: str = arg("", "an MCP server command (e.g. \"python mcp_server.py\"): its tools join --tools' (stdio)")
    best_of: int = arg(0, "sample N answers and keep one reaching the majority's final answer, the votes weighed "
                          "by the --verifier's scores when there is one (chat models; 0 = off)")
    verifier: str = arg("", "with --best_of: a verifier folder (verifier.py) that scores the answers")


# ----------------------------------------------------------------------------------
# The REPL


class Session:
    """An interactive conversation: the engine, the sampling settings, a system prompt and the history."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str = "", stats: bool = False,
                 use_cache: bool = True, index: Index | None = None, toolbox=None, memory: Memory | None = None,
                 docs_k: int = 3, memory_k: int = 3, max_tool_steps: int = 5, tool_schemas: bool = True,
                 best_of: int = 0, verifier=None):
        self.engine, self.params, self.system = engine, params, system
        self.stats, self.use_cache = stats, use_cache
        self.history: list[dict] = []               # user/assistant messages, oldest first
        self.rng = engine.generator(params.seed)
        self.index, self.toolbox, self.memory = index, toolbox, memory
        self.docs_k, self.memory_k, self.max_tool_steps = docs_k, memory_k, max_tool_steps
        self.tool_schemas, self.best_of, self.verifier = tool_schemas, best_of, verifier
        self.sources: list = []                      # what retrieval found for the last question
        if (index or toolbox or memory) and not engine.chat:
            raise ValueError("--docs, --tools and --memory need a chat model: use a chat checkpoint, or --chat on")
        if memory is not None:                       # the persona and the conversation survive restarts
            if system:
                memory.persona = system
            self.system = memory.persona
            self.history = memory.recent_messages()

    def prompt_messages(self, history: list[dict], user_text: str) -> list[dict]:
        """What the model is shown: the system prompt (with what memory recalls from outside the
        window), the history kept, and the user's message (with the passages retrieval found)."""
        system = self.system
        if self.memory is not None:
            shown = {f"{m['role']}: {m['content']}" for m in history}
            recalled = [r for r in self.memory.recall(user_text, self.memory_k + len(shown)) if r.text not in shown]
            system = system_with_memories(system, recalled[:self.memory_k])
        user = with_sources(user_text, self.sources) if self.sources else user_text
        return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user}]

    def conversation_ids(self, user_text: str) -> list[int]:
        """System prompt + history + the new user turn, as ids. If it does not fit (leaving
        room for an answer), the oldest turns are dropped; the system prompt always stays.
        A message too long even on its own is refused and the history kept as it was."""
        room = min(self.params.max_new_tokens, self.engine.context // 4)
        tools = self.toolbox.schemas() if self.toolbox and self.tool_schemas else None
        self.sources = self.index.search(user_text, self.docs_k) if self.index else []
        history = self.history
        while True:
            messages = self.prompt_messages(history, user_text)
            try:
                ids = self.engine.chat_ids(messages, tools)
            except ValueError:
                if not history:
                    raise                            # the message alone does not fit: nothing forgotten
                ids = None
            if ids is not None and (self.engine.room(len(ids)) >= room or not history):
                dropped = (len(self.history) - len(history)) // 2
                if dropped:
                    print(f"[history longer than the context: the oldest {dropped} turn(s) dropped]")
                self.history = history
                return ids
            history = history[2:]                    # try without the oldest user/assistant pair

    def answer(self, text: str):
        """Stream the model's answer to one line of input (chat) or its continuation (text)."""
        ids = self.conversation_ids(text) if self.engine.chat else self.engine.text_ids(text)
        if self.sources:
            print(f"[sources: {', '.join(h.chunk.cite for h in self.sources)}]")
        if self.toolbox:
            return self.agent_answer(text)
        if self.best_of > 1 and self.engine.chat:
            return self.best_of_answer(text, ids)
        if not self.engine.chat:
            print(text, end="", flush=True)          # the continuation follows the text it continues
        answer = ""
        try:
            for delta in self.engine.stream([ids], self.params, generator=self.rng, use_cache=self.use_cache):
                answer += delta.text
                print(delta.text, end="", flush=True)
        except KeyboardInterrupt:
            print("\n[stopped]", end="")
        finally:
            print()
            if self.engine.chat:                     # what was shown is what the assistant said
                self.remember_turn(text, answer)
        if self.stats:
            print(self.engine.stats.line())

    def remember_turn(self, user_text: str, answer: str):
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        if self.memory is not None:
            self.memory.add_turn("user", user_text)
            self.memory.add_turn("assistant", answer)

    def best_of_answer(self, text: str, ids: list[int]):
        """Best of N: self.best_of answers sampled as one batch, one kept (scoring.pick_best: the
        majority vote, weighed by the verifier when there is one), shown and kept in the history with the reason."""
        params = self.params if self.params.temperature > 0 else dataclasses.replace(self.params, temperature=0.7)
        answers = [""] * self.best_of
        for delta in self.engine.stream([ids] * self.best_of, params, generator=self.rng, use_cache=self.use_cache):
            answers[delta.row] += delta.text
        scores = score_answers(self.verifier, self.engine.tokenizer, self.prompt_messages(self.history, text),
                               answers) if self.verifier is not None else None
        kept, why = pick_best(answers, scores)
        print(f"{answers[kept]}\n[best of {self.best_of} at temperature {params.temperature:g}: {why}]")
        self.remember_turn(text, answers[kept])
        if self.stats:
            print(self.engine.stats.line())

    def agent_answer(self, text: str):
        """The agent loop (agent.py) on the conversation: tool calls and results are printed as they
        happen; the history keeps the question and the final answer."""
        def show(kind: str, data: dict):
            if kind == "tool_call":
                print(f"\n[calling {data['name'] or '?'}({json.dumps(data['arguments'], ensure_ascii=False)})]")
            else:
                print(f"[{data['name'] or 'error'} -> {data['content']}]")
        messages = self.prompt_messages(self.history, text)
        answerer = engine_answerer(self.engine, self.params, on_text=lambda piece: print(piece, end="", flush=True),
                                   generator=self.rng, offer_schemas=self.tool_schemas)
        result = None
        try:
            result = run_agent(answerer, messages, self.toolbox, self.max_tool_steps, on_event=show)
        except KeyboardInterrupt:
            print("\n[stopped]", end="")
        finally:
            print()
        if result is not None:
            if result.stopped:
                print(f"[no answer after {result.steps} model calls (--max_tool_steps)]")
            self.remember_turn(text, result.answer)
        if self.stats:
            print(self.engine.stats.line())

    # --- commands ---------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; return False when the REPL should end."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        handler = {"/help": self.cmd_help, "/reset": self.cmd_reset, "/system": self.cmd_system,
                   "/set": self.cmd_set, "/save": self.cmd_save, "/load": self.cmd_load,
                   "/remember": self.cmd_remember, "/forget": self.cmd_forget}.get(name)
        if handler is None:
            print(f"error: unknown command {name}: /help lists the commands "
                  f"(start the line with a space to send text that begins with /)")
        else:
            try:
                handler(rest)
            except (ValueError, FileNotFoundError) as e:
                print(f"error: {e}")
        return True

    def cmd_help(self, _=""):
        print("/help                 this list\n"
              "/reset                forget the conversation\n"
              "/system TEXT          set the system prompt (and start over); /system alone shows it\n"
              "/set NAME VALUE       change a sampling setting, e.g. /set temperature 0.7; /set alone lists them\n"
              "/save [FILE]          save the conversation and settings as JSON (default chat.json)\n"
              "/load [FILE]          load a conversation saved by /save\n"
              "/remember TEXT        keep a note in long-term memory (--memory); /remember alone lists the notes\n"
              "/forget TEXT          forget the notes containing TEXT; /forget all forgets every note and turn\n"
              "/exit                 quit (or Ctrl-D); Ctrl-C stops an answer\n"
              f"settings: {', '.join(SAMPLING_NAMES)}")

    def cmd_reset(self, _=""):
        self.history = []
        print("[conversation reset]")

    def cmd_system(self, text: str):
        if not self.engine.chat:
            raise ValueError("this is a text model: it continues text and has no system prompt "
                             "(use a chat checkpoint, or --chat on)")
        if not text:
            print(f"[system prompt: {self.system!r}]")
            return
        self.system, self.history = text, []
        if self.memory is not None:
            self.memory.persona = text               # kept: the next session starts with it
        print(f"[system prompt: {self.system!r}; conversation reset]")

    def needs_memory(self):
        if self.memory is None:
            raise ValueError("there is no long-term memory: start with --memory FILE.db")
        return self.memory

    def cmd_remember(self, text: str):
        memory = self.needs_memory()
        if not text:
            print("\n".join(f"  {i}. {note}" for i, note in memory.notes()) or "[no notes yet]")
            return
        memory.remember(text)
        print(f"[remembered: {text}]")

    def cmd_forget(self, text: str):
        gone = self.needs_memory().forget(text)
        if text == "all":
            self.history = []
        print(f"[forgot {gone} record(s)]")

    def cmd_set(self, rest: str):
        if not rest:
            print("  ".join(f"{n}={getattr(self.params, n)!r}" for n in SAMPLING_NAMES))
            return
        name, _, value = rest.partition(" ")
        if name not in SAMPLING_NAMES:
            raise ValueError(f"unknown setting {name!r}: choose from {', '.join(SAMPLING_NAMES)}")
        self.params = self.params.replace(**{name: parse_setting(name, value.strip())}).validate()
        if name == "seed":
            self.rng = self.engine.generator(self.params.seed)
        print(f"[{name} = {getattr(self.params, name)!r}]")

    def cmd_save(self, path: str):
        path = Path(path or "chat.json")
        record = {"system": self.system, "messages": self.history, "settings": dataclasses.asdict(self.params)}
        atomic_write_text(path, json.dumps(record, ensure_ascii=False, indent=2))
        print(f"[saved {len(self.history) // 2} turns to {path}]")

    def cmd_load(self, path: str):
        path = Path(path or "chat.json")
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: save a conversation with /save {path} first")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            system, messages = record.get("system", ""), record.get("messages", [])
            settings = {k: v for k, v in record.get("settings", {}).items() if k in SAMPLING_NAMES}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{path} is not a conversation saved by /save ({type(e).__name__})") from None
        if messages:
            check_messages(messages, where=str(path))
        params = self.params.replace(**{k: tuple(v) if k == "stop" else v for k, v in settings.items()}).validate()
        self.system, self.history, self.params = system, messages, params
        print(f"[loaded {len(messages) // 2} turns from {path}]")


def parse_setting(name: str, value: str):
    """Text typed after /set NAME -> a value of the setting's type."""
    kind = type(getattr(SamplingParams(), name))
    if kind is tuple:                                # stop: one stop string (\n allowed), or nothing
        return (unescape(value),) if value else ()
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} needs a {kind.__name__}, got {value!r}") from None


def has_undecodable_bytes(line: str) -> bool:
    """True if the line had bytes that are not UTF-8 (kept as surrogates by errors='surrogateescape')."""
    return any("\udc80" <= ch <= "\udcff" for ch in line)


def repl(session: Session):
    engine = session.engine
    mode = "chat" if engine.chat else "text continuation"
    print(f"{engine.model.summary()}\n{engine.name}: {mode}. /help lists the commands, /exit or Ctrl-D quits.")
    try:
        import readline  # noqa: F401  (line editing and history where available)
    except ImportError:
        pass
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        if has_undecodable_bytes(line):
            print("error: that line is not valid UTF-8 text: set your terminal to UTF-8 and type it again")
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        if not line.strip():
            continue
        try:
            session.answer(line)
        except ValueError as e:
            print(f"error: {e}")


# ----------------------------------------------------------------------------------
# One JSON answer per line of stdin


def read_jsonl_requests(raw: bytes, engine: Engine, system: str, index: Index | None = None,
                        docs_k: int = 3) -> list[tuple[dict, list[int]]]:
    """stdin -> (request, prompt ids) per non-empty line; a bad line fails the whole run, naming it.
    index (--docs): the last user message gets the passages found for it."""
    requests = []
    for number, line_bytes in enumerate(raw.splitlines(), 1):
        where = f"stdin line {number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not valid UTF-8 (byte 0x{line_bytes[e.start]:02x} at column "
                             f"{e.start + 1}): save the input as UTF-8") from None
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                request = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: starts with {{ but is not valid JSON ({e.msg}, column {e.colno})") from None
        else:
            request = {"prompt": line}
        if "messages" in request:
            check_messages(request["messages"], where=where)
            messages = request["messages"]
        elif isinstance(request.get("prompt"), str):
            messages = [{"role": "user", "content": request["prompt"]}]
        else:
            raise ValueError(f'{where}: expected text, {{"prompt": "..."}} or {{"messages": [...]}}')
        if system and engine.chat and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        try:
            if index is not None and messages[-1]["role"] == "user":
                hits = index.search(messages[-1]["content"], docs_k)
                messages = messages[:-1] + [{"role": "user", "content": with_sources(messages[-1]["content"], hits)}]
            requests.append((request, engine.prompt_ids(messages)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return requests


def answer_jsonl(engine: Engine, cfg: InferenceConfig, params: SamplingParams, index: Index | None = None):
    """Read every prompt first (a bad line stops the run before anything is written), then
    answer them batch by batch, one JSON object per line, in input order."""
    requests = read_jsonl_requests(sys.stdin.buffer.read(), engine, cfg.system, index, cfg.docs_k)
    total_tokens, total_seconds = 0, 0.0
    for start in range(0, len(requests), cfg.batch_size):
        chunk = requests[start:start + cfg.batch_size]
        for (request, _), done in zip(chunk, engine.complete([ids for _, ids in chunk], params, cfg.batch_size)):
            record = {**request, "answer": done.text, "finish_reason": done.finish_reason,
                      "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
            print(json.dumps(record, ensure_ascii=False), flush=True)
            total_tokens += done.completion_tokens
        total_seconds += engine.stats.seconds
    if cfg.stats:
        print(f"[{len(requests)} answers, {total_tokens} tokens, {total_tokens / max(total_seconds, 1e-9):.1f} "
              f"tokens/s]", file=sys.stderr)


def main(argv=None):
    cfg = parse_config(InferenceConfig, __doc__.split("\n\n")[0].strip(), argv)
    params = SamplingParams.of(cfg)
    if cfg.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.best_of == 1 or cfg.best_of < 0 or (cfg.best_of and cfg.jsonl) or (cfg.verifier and not cfg.best_of):
        raise ValueError(f"--best_of takes a number of samples, 2 or more, in the REPL or with --prompt (got "
                         f"{cfg.best_of}{' with --jsonl' if cfg.jsonl else ''}), and --verifier goes with it; "
                         f"evaluation.py --samples and verifier.py --best_of score them on a file")
    for name in ("docs_k", "max_tool_steps", "memory_k"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.jsonl and (cfg.tools or cfg.memory or cfg.mcp):
        raise ValueError("--tools, --mcp and --memory work in the REPL and with --prompt, not with --jsonl "
                         "(agent_eval.py measures tool use on a file of questions)")
    index = Index.from_folder(cfg.docs) if cfg.docs else None
    memory = Memory(cfg.memory) if cfg.memory else None
    toolbox = builtin_toolbox([t.strip() for t in cfg.tools.split(",") if t.strip()], index, memory)
    if index is not None:
        print(f"[--docs {cfg.docs}: {len(index)} passages indexed]", file=sys.stderr)
    engine = Engine.load(cfg)
    if cfg.best_of and not engine.chat:
        raise ValueError("--best_of compares answers: it needs a chat model (a checkpoint made by full_sft.py, "
                         "or --chat on)")
    verifier = verifier_for(cfg.verifier, engine) if cfg.verifier else None
    with ExitStack() as stack:
        if cfg.mcp:                                  # the server runs while the session does
            for tool in stack.enter_context(mcp_tools(shlex.split(cfg.mcp))):
                toolbox.add(tool)
            print(f"[--mcp: tools {', '.join(toolbox.tools)}]", file=sys.stderr)
        session = Session(engine, params, cfg.system, cfg.stats, cfg.kv_cache, index, toolbox if len(toolbox) else None,
                          memory, cfg.docs_k, cfg.memory_k, cfg.max_tool_steps, cfg.tool_schemas, cfg.best_of, verifier)
        if cfg.jsonl:
            answer_jsonl(engine, cfg, params, index)
        elif cfg.prompt:
            session.answer(cfg.prompt)
        else:
            repl(session)


if __name__ == "__main__":
    main_guard(main)
