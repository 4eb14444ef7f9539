"""data/: reading user files, clear errors, tokenizing into .bin, batches."""
import json

import numpy as np
import pytest
import torch

from data.chat_data import read_conversations, read_preference_pairs, stage_data
from data.corpus import fortune_entries, split_english
from data.pretrain_data import (DataError, MixedBatches, TokenBin, prepare_dataset, read_documents,
                                rows_per_source)
from tokenizer import Tokenizer

TEXT = "To be, or not to be, that is the question.\n床前明月光，疑是地上霜。\n" * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_texts([TEXT], vocab_size=300)


def test_txt_is_read_whole_and_split_into_train_and_val(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert "".join(read_documents(path)) == TEXT
    train, val = "".join(read_documents(path, "train")), "".join(read_documents(path, "val"))
    assert train + val == TEXT and 0 < len(val.encode()) <= 0.02 * len(TEXT.encode()) + 100


def test_jsonl_reads_the_text_field_and_holds_out_every_100th(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(1, 251)))
    assert list(read_documents(path, "val")) == ["doc 100", "doc 200"]
    assert len(list(read_documents(path, "train"))) == 248


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"a\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"content": "x"}\n', r'a\.jsonl:2: no "text" string field'),
    ('{"text": "ok"}\n["text"]\n', r'a\.jsonl:2: no "text"'),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        list(read_documents(path))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("line one\nline two\n".encode() + "中文".encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"gbk\.txt:3: bytes that are not UTF-8.*iconv"):
        list(read_documents(path))


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_documents(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        list(read_documents(tmp_path / "empty.txt"))


def test_prepare_dataset_writes_bins_that_decode_back(tmp_path, tok):
    src = tmp_path / "a.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = prepare_dataset({"train": [src]}, tok, tmp_path / "bins", user_files=True)
    meta = json.loads((out / "meta.json").read_text())
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert meta["splits"]["train"]["tokens"] == len(train)
    assert train[-1] == tok.eot_id
    decoded = tok.decode(train[:-1].tolist()) + tok.decode(val[:-1].tolist())
    assert decoded == TEXT
    # a second call reuses the cache (same files, same tokenizer)
    mtime = (out / "train.bin").stat().st_mtime_ns
    prepare_dataset({"train": [src]}, tok, tmp_path / "bins", user_files=True)
    assert (out / "train.bin").stat().st_mtime_ns == mtime


def test_random_batches_are_shifted_windows(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    data = TokenBin(tmp_path / "t.bin", "uint16")
    x, y = data.random_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    x2, _ = data.random_batch(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_eval_batches_cover_consecutive_windows_once(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    data = TokenBin(tmp_path / "t.bin", "uint16")
    xs = torch.cat([x for x, _ in data.eval_batches(batch_size=2, block_size=10)])
    assert xs.shape == (9, 10) and torch.equal(xs.flatten(), torch.arange(90))


def test_fortune_entries_strip_colour_codes(tmp_path):
    path = tmp_path / "f"
    path.write_text("\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n第二条\n%\n", encoding="utf-8")
    assert fortune_entries(path) == ["《静夜思》\n床前明月光", "第二条"]


def test_english_split_is_deterministic_and_loses_nothing():
    text = "".join(f"line {i}\n" for i in range(5000))
    train, val = split_english(text)
    assert split_english(text) == (train, val)
    assert sorted((train + val).splitlines()) == sorted(text.splitlines())
    assert 0.04 < len(val) / len(text) < 0.06


def test_rows_are_shared_in_proportion_and_always_add_up():
    assert rows_per_source(16, {"en": 0.75, "zh": 0.25}) == {"en": 12, "zh": 4}
    assert rows_per_source(5, {"a": 1, "b": 1, "c": 1}) in ({"a": 2, "b": 2, "c": 1}, {"a": 2, "b": 1, "c": 2},
                                                           {"a": 1, "b": 2, "c": 2})
    for b in range(1, 40):
        assert sum(rows_per_source(b, {"en": 0.7, "zh": 0.3}).values()) == b


def test_mixed_batches_take_rows_from_each_source(tmp_path):
    low, high = tmp_path / "low.bin", tmp_path / "high.bin"
    np.arange(0, 500, dtype=np.uint16).tofile(low)
    np.arange(1000, 1500, dtype=np.uint16).tofile(high)
    mix = MixedBatches({"low": TokenBin(low, np.uint16), "high": TokenBin(high, np.uint16)},
                       {"low": 0.75, "high": 0.25})
    x, y = mix.random_batch(8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    from_high = (x[:, 0] >= 1000).sum().item()
    assert from_high == 2
    assert torch.equal(y[:, :-1], x[:, 1:])
    with pytest.raises(ValueError, match="one per source"):
        MixedBatches({"low": TokenBin(low, np.uint16)}, {"high": 1.0})


def test_the_chat_share_of_pretraining_is_every_conversation_rendered_and_ended_like_a_document(tmp_path, tok):
    """pretrain.py --chat_share reads SFT's conversations as a token stream: the chat template's own
    tokens, then <|endoftext|> after each one, as after every document of the text."""
    from data.chat_data import chat_token_stream, write_jsonl
    from tokenizer.chat import render_chat
    records = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Who are you?"},
                                                 {"role": "assistant", "content": "A model."}]}]
    write_jsonl(tmp_path / "chats.jsonl", records)
    stream = chat_token_stream(tmp_path / "chats.jsonl", tok)
    first = render_chat(CHAT, tok)[0]
    assert stream.tolist()[:len(first) + 1] == first + [tok.eot_id]
    assert (stream == tok.eot_id).sum() == 2 and stream[-1] == tok.eot_id
    assert (stream == tok.im_start_id).sum() == 4              # user and assistant turns of each conversation
    window = TokenBin(tmp_path / "chats.jsonl", None, stream)   # in memory: the same random windows as a .bin
    x, y = window.random_batch(3, 8, torch.Generator().manual_seed(0))
    assert x.shape == (3, 8) and torch.equal(y[:, :-1], x[:, 1:])


# --- chat data (data/chat_data.py): the formats people have, and chat advice for the rest ---

CHAT = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
CHAT_RECORDS = {
    "openai": {"messages": CHAT},
    "minimind": {"conversations": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("kind", list(CHAT_RECORDS))
def test_chat_data_accepts_the_common_formats_as_jsonl_or_a_json_array(tmp_path, kind, suffix):
    path = tmp_path / f"chat{suffix}"
    records = [CHAT_RECORDS[kind]] * 3
    if suffix == ".json":       # alpaca's usual file: one JSON array, pretty-printed
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert [r["conversations"] for r in read_conversations(path)] == [CHAT] * 3


def test_sharegpt_system_turn_and_json_lines_saved_as_json(tmp_path):
    path = tmp_path / "sharegpt.json"          # many datasets name a JSON Lines file .json
    record = {"conversations": [{"from": "system", "value": "Be brief."}, *CHAT_RECORDS["sharegpt"]["conversations"]]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    (first, _) = read_conversations(path)
    assert first["conversations"] == [{"role": "system", "content": "Be brief."}, *CHAT]


@pytest.mark.parametrize("name,content", [("chat.csv", "instruction,input,output\nAdd 2 and 3.,,5\n"),
                                          ("chat.txt", "User: hi\nAssistant: yo\n")])
def test_other_chat_files_get_one_line_of_chat_advice(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        list(read_conversations(path))
    message = str(error.value)
    assert name in message and ".jsonl" in message and '"messages"' in message and "alpaca" in message
    assert '{"text"' not in message and "\n" not in message      # not the pretraining advice


@pytest.mark.parametrize("records,message", [
    ([CHAT_RECORDS["openai"], {"text": "hi"}], 'chat.json: record 2: not a chat record (found keys: text'),
    ([CHAT_RECORDS["openai"], {"conversations": [{"from": "bot", "value": "hi"}]}],
     "chat.json: record 2: message 0 has \"from\": 'bot'"),
    ([CHAT_RECORDS["openai"], {"messages": [{"role": "user", "content": "hi"}]}],
     "chat.json: record 2: the conversation has no final assistant turn"),
])
def test_bad_chat_records_in_a_json_array_name_the_record(tmp_path, records, message):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        list(read_conversations(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_broken_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": \n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.json:4: not valid JSON .*a \.json file must hold one list"):
        list(read_conversations(path))


def test_preference_pairs_read_from_a_json_array(tmp_path):
    pair = {"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "6"}]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair, pair]), encoding="utf-8")
    assert [p["rejected"][-1]["content"] for p in read_preference_pairs(path)] == ["6", "6"]
    (tmp_path / "pairs.csv").write_text("chosen,rejected\n5,6\n", encoding="utf-8")
    with pytest.raises(DataError, match=r'pairs\.csv: .*\.jsonl.*"chosen"'):
        list(read_preference_pairs(tmp_path / "pairs.csv"))


# --- which tokenizer a run uses is printed ---

def test_pretraining_data_names_its_tokenizer_file(tmp_path, tok, capsys):
    from data.pretrain_data import prepare_pretraining_data
    text, tok_path = tmp_path / "a.txt", tmp_path / "my_tok.json"
    text.write_text(TEXT, encoding="utf-8")
    tok.save(tok_path)
    prepare_pretraining_data((str(text),), str(tok_path), 300, str(tmp_path / "cache"))
    assert f"tokenizer: {tok_path} ({tok.vocab_size} tokens, fingerprint {tok.fingerprint})" in capsys.readouterr().out


def test_chat_stage_data_names_its_tokenizer_file(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT_RECORDS["openai"]) + "\n" * 2 + json.dumps(CHAT_RECORDS["openai"]) + "\n")
    stage_data(read_conversations, str(path), "", lambda: None, tokenizer_file="weight/sft/tokenizer.json")
    assert "tokenizer: weight/sft/tokenizer.json" in capsys.readouterr().out
