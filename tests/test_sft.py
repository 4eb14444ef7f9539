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
    ('{"text": "hi"}', 'a.jsonl:2: not a chat record (found keys: text'),
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
    examples = encode_conversations([short, long, short], tok, block_size=32, where="c.jsonl")
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


def test_data_without_eval_data_holds_out_every_20th_and_later_stages_find_it(tiny_pretrained, tmp_path, capsys):
    from data.chat_data import HOLD_OUT_EVERY_NTH, sft_data_of
    records = list(read_conversations(tiny_pretrained / "train.jsonl"))
    flags = ["--init_from", str(tiny_pretrained / "ckpt"), "--max_steps", "1", "--eval_interval", "1",
             "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "1"]
    with pytest.raises(ValueError, match="--eval_data needs --data"):
        full_sft.main(flags + ["--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(tmp_path / "x")])
    full_sft.main(flags + ["--data", str(tiny_pretrained / "train.jsonl"), "--out_dir", str(tmp_path / "sft")])
    held_out = records[::HOLD_OUT_EVERY_NTH]
    assert f"data: no --eval_data: {len(held_out)} records of" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1                 # scored on the held-out 20th, family by family
    assert set(metrics["accuracy_by_family"]) == {r["family"] for r in held_out}
    # lora.py and dpo.py read the same split back from the SFT model's config.json
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    train, held, where = sft_data_of(config)
    assert held == held_out and len(train) == len(records) - len(held_out) and where.endswith("train.jsonl")
    # a model that is not an SFT model (or names no files) falls back to the default generated data
    from data.chat_data import DEFAULT_CHAT_DIR
    assert sft_data_of({"stage": "pretrain"})[2].startswith(str(DEFAULT_CHAT_DIR))


def test_preference_pairs_must_share_their_prompt(tmp_path):
    from data.chat_data import read_preference_pairs
    user = {"role": "user", "content": "hi"}
    pair = {"chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}
    (tmp_path / "p.jsonl").write_text(json.dumps(pair) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="p.jsonl:1: chosen and rejected must share the conversation"):
        list(read_preference_pairs(tmp_path / "p.jsonl"))
