"""inference.py with --docs, --tools and --memory: the REPL session shows sources and tool calls; bad flags are one line."""
import pytest
import torch

import inference
from engine import Delta, Engine, SamplingParams
from inference import Session
from model import GPT, ModelConfig
from retrieval import Index
from tokenizer import Tokenizer
from tools import builtin_toolbox

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37*91"}}\n</tool_call>'


@pytest.fixture
def engine(monkeypatch):
    """A tiny chat engine whose stream says the texts in .script, keeping the prompts it was given in .prompts."""
    tok = Tokenizer.from_texts([CALL + " The capital of Zorbia is Quellin. What is 37*91?\n" * 20], vocab_size=300,
                               progress=False)
    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=32)),
                    tok, chat=True)
    engine.script, engine.prompts = [], []

    def stream(prompts, params, *args, **kwargs):
        engine.prompts.append(tok.decode(prompts[0]))
        yield Delta(0, engine.script.pop(0), 1, "stop")
    monkeypatch.setattr(engine, "stream", stream)
    return engine


def test_docs_show_their_sources_and_the_history_keeps_the_plain_question(engine, capsys):
    index = Index.from_texts([("zorbia.md", "The capital of Zorbia is Quellin."), ("bread.md", "Bread is baked.")])
    session = Session(engine, SamplingParams.greedy(8), index=index, docs_k=1)
    engine.script = ["Quellin [zorbia.md#0]."]
    session.answer("What is the capital of Zorbia?")
    out = capsys.readouterr().out
    assert "[sources: zorbia.md#0]" in out and "Quellin [zorbia.md#0]." in out
    assert "[zorbia.md#0] The capital of Zorbia is Quellin." in engine.prompts[0] and "Bread" not in engine.prompts[0]
    assert session.history[0] == {"role": "user", "content": "What is the capital of Zorbia?"}


def test_jsonl_prompts_get_the_passages_too(engine):
    index = Index.from_texts([("zorbia.md", "The capital of Zorbia is Quellin."), ("bread.md", "Bread is baked.")])
    [(request, ids)] = inference.read_jsonl_requests(b'{"prompt": "Capital of Zorbia?"}\n', engine, "", index, 1)
    prompt = engine.tokenizer.decode(ids)
    assert request == {"prompt": "Capital of Zorbia?"} and "[zorbia.md#0] The capital of Zorbia is Quellin." in prompt


def test_tools_run_the_agent_loop_and_print_each_call(engine, capsys):
    session = Session(engine, SamplingParams.greedy(8), toolbox=builtin_toolbox(["calculator"]))
    engine.script = [CALL, "37*91 = 3367."]
    session.answer("What is 37*91?")
    out = capsys.readouterr().out
    assert '[calling calculator({"expression": "37*91"})]' in out and "[calculator -> 3367]" in out
    assert out.rstrip().endswith("37*91 = 3367.")
    assert "<tool_response>\n3367\n</tool_response>" in engine.prompts[1] and "# Tools" in engine.prompts[0]
    assert session.history == [{"role": "user", "content": "What is 37*91?"},
                               {"role": "assistant", "content": "37*91 = 3367."}]


def test_a_model_that_never_stops_calling_is_stopped_and_says_so(engine, capsys):
    session = Session(engine, SamplingParams.greedy(8), toolbox=builtin_toolbox(["calculator"]), max_tool_steps=2,
                      tool_schemas=False)
    engine.script = [CALL, CALL]
    session.answer("What is 37*91?")
    assert "[no answer after 2 model calls (--max_tool_steps)]" in capsys.readouterr().out
    assert "# Tools" not in engine.prompts[0]                       # --no-tool_schemas: the calls still run


@pytest.mark.parametrize("flags,message", [
    (["--tools", "search"], "--tools search needs documents to search: add --docs FOLDER"),
    (["--tools", "memory"], "--tools memory needs a memory database"),
    (["--tools", "weather"], "unknown tool 'weather'"),
    (["--docs", "/no/such/folder"], "no such folder"),
    (["--docs_k", "0"], "--docs_k must be at least 1"),
    (["--jsonl", "--tools", "calculator"], "not with --jsonl"),
])
def test_bad_flags_are_one_clear_line_before_any_model_loads(flags, message):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        inference.main(["--ckpt", "/no/such/ckpt", *flags])
    assert message in str(e.value)
