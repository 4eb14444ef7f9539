"""agent_eval.py: the retrieval and tool measurements, on a tiny model (scripted where the answer must be known)."""
import json

import pytest
import torch

from agent_eval import AgentEvalConfig, addition_report, contains_number, facts_report
from data.tool_data import write_tool_data
from engine import Delta, Engine, SamplingParams
from model import GPT, ModelConfig
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine():
    tok = Tokenizer.from_texts(["The capital of Zorbia is Quellin. What is 12 + 34? <tool_call> {} \n" * 20],
                               vocab_size=300, progress=False)
    torch.manual_seed(0)
    return Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=32)),
                  tok, chat=True)


def test_facts_report_scores_retrieval_and_answers_with_and_without_it(engine):
    cfg = AgentEvalConfig(n_countries=4, limit=3, k=2)
    report = facts_report(engine, cfg, SamplingParams.greedy(4))
    assert report["questions"] == 20 and report["answered"] == 3
    assert report["recall_at_k"]["bm25"] >= 0.9 and 0 <= report["recall_at_k"]["dense"] <= 1
    assert set(report["accuracy"]) == {"without_retrieval", "with_retrieval"}


def test_addition_accuracy_counts_a_model_that_calls_the_calculator_right(engine, tmp_path, monkeypatch):
    paths = write_tool_data(tmp_path, n_train=1, n_eval=4)
    questions = [json.loads(line) for line in paths["eval_tools"].read_text().splitlines()]
    script = []
    for q in questions:                                      # a model that calls right, then reads the result
        a, b = q["conversations"][2]["content"], q["expected"]
        script += [a, f"The sum is {b}."]

    def stream(prompts, params, *args, **kwargs):                 # each row says the next scripted text
        for row in range(len(prompts)):
            yield Delta(row, script.pop(0), 1, "stop")
    monkeypatch.setattr(engine, "stream", stream)
    cfg = AgentEvalConfig(task="addition", data=str(paths["eval_tools"]), tools="calculator")
    report = addition_report(engine, cfg, SamplingParams.greedy(8))
    assert report["accuracy"] == 1.0 and report["called_a_tool"] == 1.0 and not script

    script[:] = ["I think it is 1000."] * 4                   # a model that guesses, without the tool
    report = addition_report(engine, AgentEvalConfig(task="addition", data=str(paths["eval_tools"])),
                             SamplingParams.greedy(8))
    assert report["accuracy"] == 0.0 and report["called_a_tool"] == 0.0


def test_a_sum_counts_only_as_a_whole_number():
    assert contains_number("4821 + 3907 = 8728.", "8728") and contains_number("8,728", "8728")
    assert not contains_number("87285", "8728") and not contains_number("18728", "8728")


def test_help_lists_the_flags_and_a_bad_value_is_one_line(capsys):
    import agent_eval
    import mcp_server
    for main in (agent_eval.main, mcp_server.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--task {facts,addition}" in out and "--docs DOCS" in out and "--memory MEMORY" in out
    with pytest.raises(ValueError, match="--k must be at least 1"):
        agent_eval.main(["--k", "0"])
    with pytest.raises(FileNotFoundError, match="make the questions with python -m data.tool_data"):
        agent_eval.main(["--task", "addition", "--data", "/no/such/file.jsonl"])
