"""Chat data generation and reading, evaluation, and full_sft.py end to end on a tiny model."""
import json

import pytest

import full_sft
from data.chat_data import WORD_FAMILIES, generate_chat_data, is_held_out, read_conversations, synthetic_names
from data.pretrain_data import DataError

from conftest import WORDS  # noqa: E402  (a small word list shared with test_lora.py)


def test_generation_is_deterministic_for_a_seed():
    assert generate_chat_data(WORDS, 50, 3, seed=1) == generate_chat_data(WORDS, 50, 3, seed=1)
    assert generate_chat_data(WORDS, 50, 3, seed=1) != generate_chat_data(WORDS, 50, 3, seed=2)


def test_held_out_items_never_appear_in_training():
    train, held_out = generate_chat_data(WORDS, 2000, 20, seed=0)
    assert {r["family"] for r in held_out} == set(WORD_FAMILIES)
    train_texts = {json.dumps(r["conversations"]) for r in train}
    assert not any(json.dumps(r["conversations"]) in train_texts for r in held_out)
    held_words = {w for w in WORDS if is_held_out(w)}
    held_names = {n for n in synthetic_names() if is_held_out(n)}
    for r in train:
        text = " ".join(m["content"] for m in r["conversations"])
        tokens = set(text.replace("\n", " ").replace("!", " ").replace(".", " ").replace("。", " ").split())
        assert not tokens & held_words, r
        assert not any(name in text for name in held_names), r
    for r in held_out:
        if r["family"] == "repeat":
            assert is_held_out(r["conversations"][-1]["content"].split("\n")[0])


def test_alpaca_records_are_read_as_conversations(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n", encoding="utf-8")
    (record,) = read_conversations(path)
    assert record["conversations"] == [{"role": "user", "content": "Add\n2 and 3"},
                                       {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("line,message", [
    ("{not json", "a.jsonl:2: not valid JSON"),
    ('{"text": "hi"}', 'a.jsonl:2: no "conversations" list'),
    ('{"conversations": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "a.jsonl:2: roles out of order"),
    ('{"conversations": [{"role": "user", "content": "hi"}]}', "a.jsonl:2: the conversation has no final assistant"),
    ('{"conversations": [{"role": "robot", "content": "hi"}]}', "a.jsonl:2: message 0 has role 'robot'"),
])
def test_bad_chat_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "a.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises((DataError, ValueError)) as error:
        list(read_conversations(path))
    assert message in str(error.value)


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_full_sft_runs_end_to_end_and_reports_accuracy(tiny_pretrained, tmp_path, loss_on):
    out = tmp_path / "sft"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
                   "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(out), "--max_steps", "6",
                   "--eval_interval", "3", "--time_budget", "0", "--batch_size", "8", "--max_new_tokens", "4",
                   "--loss_on", loss_on])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and set(metrics["accuracy_by_family"]) == set(WORD_FAMILIES)
    assert metrics["loss_on"] == loss_on and metrics["steps"] == 6
    for name in ("model.pt", "config.json", "tokenizer.json", "log.csv", "loss.png"):
        assert (out / name).exists(), name


def test_evaluation_command_writes_a_json_report(tiny_pretrained, tmp_path):
    import evaluation
    evaluation.main(["--ckpt", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "eval.jsonl"),
                     "--tasks", "chat", "--max_new_tokens", "3", "--out", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())["chat"]
    assert report["n"] == 2 * len(WORD_FAMILIES) and 0 <= report["accuracy"] <= 1


def test_conversations_longer_than_the_context_are_skipped_and_counted(capsys):
    from data.chat_data import encode_conversations
    from tokenizer import Tokenizer
    tok = Tokenizer.from_texts([" ".join(WORDS)], vocab_size=280, progress=False)
    short = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    long = {"conversations": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "yo"}]}
    examples = encode_conversations([short, long, short], tok, block_size=32, loss_on="assistant", where="c.jsonl")
    assert len(examples) == 2
    assert "c.jsonl: skipped 1 conversations longer than the context of 32 tokens" in capsys.readouterr().out


def test_similar_length_batches_cut_padding_and_pick_every_row_equally_often():
    import torch
    from data.chat_data import similar_length_rows
    lengths = torch.tensor([10] * 50 + [100] * 50)               # two very different lengths
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(100)
    mixed = 0
    for _ in range(2000):
        rows = similar_length_rows(lengths, 8, generator)
        counts[rows] += 1
        mixed += len({lengths[r].item() for r in rows}) > 1
    assert mixed < 2000 * 0.2                                    # most batches hold one length only
    assert counts[:50].sum() / counts.sum() == pytest.approx(0.5, abs=0.03)   # short and long equally often
    assert counts.min() > 0.6 * counts.mean()                    # and no row is left out
