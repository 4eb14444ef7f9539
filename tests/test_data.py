"""data/: reading user files, clear errors, tokenizing into .bin, batches."""
import json

import numpy as np
import pytest
import torch

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
