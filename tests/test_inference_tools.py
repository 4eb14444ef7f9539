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


def test_best_of_keeps_the_final_answer_most_samples_reach(engine, monkeypatch, capsys):
    """--best_of 4 without a verifier: four samples in one batch; two reach 42 (after "Answer:"), so 42 wins
    and the first sample that reached it is shown and kept; greedy settings are raised to temperature 0.7."""
    answers = ["7 * 6 = 41.\nAnswer: 41", "6 * 7 = 42.\nAnswer: 42", "Answer: 42", "Answer: 40"]
    seen = {}

    def stream(prompts, params, *args, **kwargs):
        seen.update(rows=len(prompts), temperature=params.temperature)
        for row, text in enumerate(answers):
            yield Delta(row, text, 1, "stop")
    monkeypatch.setattr(engine, "stream", stream)
    session = Session(engine, SamplingParams.greedy(8), best_of=4)
    session.answer("What is 6 * 7?")
    out = capsys.readouterr().out
    assert seen == {"rows": 4, "temperature": 0.7}
    assert out.startswith("6 * 7 = 42.\nAnswer: 42\n[best of 4 at temperature 0.7: vote 2 x '42', 1 x '41', 1 x '40']")
    assert session.history[-1] == {"role": "assistant", "content": "6 * 7 = 42.\nAnswer: 42"}


@pytest.mark.parametrize("head,kept", [((1.0, 1.0, 2.0), "Answer: 42"), ((-1.0, -1.0, 1.0), "Answer: 41")])
def test_best_of_with_a_verifier_weighs_the_votes_by_its_scores(engine, monkeypatch, capsys, head, kept):
    """With a verifier each answer's vote weighs sigmoid(its score): a verifier that likes every answer (the
    lone 41 most) leaves the majority's 42, one sure the 42s are wrong outvotes them. It scores the answers
    to the prompt the model saw (system prompt and history included)."""
    from scoring import RewardModel
    answers = ["Answer: 42", "Answer: 42", "Answer: 41"]

    def stream(prompts, params, *args, **kwargs):
        for row, text in enumerate(answers):
            yield Delta(row, text, 1, "stop")
    monkeypatch.setattr(engine, "stream", stream)
    verifier = RewardModel(engine.model)
    scored = []

    def forward(ids, last):            # a stand-in value head: the answer's length in tokens (from `last`) x head
        scored.append(ids.shape[0])
        return last.float() * torch.tensor(head)
    monkeypatch.setattr(verifier, "forward", forward)
    session = Session(engine, SamplingParams.greedy(8), system="Be brief.", best_of=3, verifier=verifier)
    session.answer("What is 6 * 7?")
    out = capsys.readouterr().out
    assert scored == [3] and out.startswith(f"{kept}\n[best of 3 at temperature 0.7: verifier-weighted vote")


def test_best_of_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="--best_of takes a number of samples, 2 or more"):
        inference.main(["--best_of", "1", "--prompt", "hi"])
    with pytest.raises(ValueError, match="with --jsonl"):
        inference.main(["--best_of", "4", "--jsonl"])
    with pytest.raises(ValueError, match="--verifier goes with it"):
        inference.main(["--verifier", "weight/verifier", "--prompt", "hi"])
