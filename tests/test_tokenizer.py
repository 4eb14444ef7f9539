"""Specification of the tokenizer: byte-level BPE trainer (bpe.py) + tiktoken-backed Tokenizer."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken

from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, train_bpe, train_tokenizer_on_files
from tokenizer.bpe import encode_reference, merge_pair

ENGLISH = ("The cat sat on the mat. The dog sat on the log, and the cat didn't mind.\n"
           "We're learning how a tokenizer turns text into numbers: 12345 apples, 678 pears!\n")
CHINESE = "我们今天学习分词器。分词器把文字变成数字，模型只认识数字。\n春天来了，花开了，我们去山上看花。\n"


def _shuffled_words(text, n_words, seed):
    """A made-up text: words (and Chinese characters) of `text` in a random order."""
    words = regex.findall(r"\p{Han}|\S+", text)
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words))


CORPUS = [ENGLISH * 20, CHINESE * 20, _shuffled_words(ENGLISH + CHINESE, 5000, seed=0)]

# Hard cases for a byte-level tokenizer: all must survive encode -> decode exactly.
TRICKY = [
    "",
    "hello world",
    "床前明月光，疑是地上霜。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇨🇳",
    "windows\r\nline\rendings\n\n\n",
    "NUL \x00 and controls \x01\x07\x1b[31m\x7f \x1c\x1f",
    "\u0301 lone combining mark, e\u0301 decomposed, é composed",
    "tabs\t\tand   spaces   ",
    "zero width\u200b\ufeff and U+FFFD \ufffd",
    "mixed 中英 text: Python写代码，hello世界！12345678",
    "<|im_end|> looks special but is typed by a user",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_texts(CORPUS, vocab_size=400, progress=False)


# --- the trainer ---------------------------------------------------------------

def test_merge_pair_replaces_left_to_right():
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge_pair([7, 7, 7], (7, 7), 9) == [9, 7]


def test_toy_corpus_gives_expected_merges():
    # "aaabdaaabac" is one chunk: bytes a=97, b=98, c=99, d=100.
    #   pairs: aa x4 (aaa has two), ab x2, bd, da, ba, ac  -> merge (a, a) = 256 "Z"
    #   now Z a b d Z a b a c: Za x2, ab x2 (tie: smaller pair (97, 98) wins) -> (a, b) = 257 "Y"
    #   now Z Y d Z Y a c: ZY x2                                              -> (Z, Y) = 258
    merges = train_bpe(["aaabdaaabac"], vocab_size=256 + 3 + 3, progress=False)
    assert merges == [(97, 97), (97, 98), (256, 257)]


def test_merge_counts_are_weighted_by_chunk_frequency():
    # " ab" occurs 3 times as a chunk, "cd" once: (32, 97) and (97, 98) count 3 each.
    merges = train_bpe([" ab ab ab cd"], vocab_size=256 + 3 + 1, progress=False)
    assert merges == [(32, 97)]


def test_incremental_trainer_equals_the_naive_definition():
    # The naive BPE loop, straight from the definition: recount every pair of every
    # chunk, merge the most frequent (ties: smallest pair). Slow, obviously right.
    text = _shuffled_words(ENGLISH + CHINESE, 400, seed=3) + " aaaa aaaaa abab"
    chunks = [list(c.encode()) for c in regex.findall(SPLIT_PATTERN, text)]
    vocab = [bytes([i]) for i in range(256)]
    naive = []
    while len(naive) < 120:
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        candidates = [(-n, p) for p, n in counts.items() if vocab[p[0]] + vocab[p[1]] not in vocab]
        if not candidates:
            break
        _, pair = min(candidates)
        naive.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        chunks = [merge_pair(ids, pair, 255 + len(naive)) for ids in chunks]
    assert train_bpe([text], vocab_size=256 + 120 + 3, progress=False) == naive


def test_vocab_size_is_respected(tok):
    assert tok.vocab_size == 400
    assert len(tok.merges) == 400 - 256 - len(SPECIAL_TOKENS)
    assert len(tok.token_bytes) == 400


def test_training_is_deterministic():
    first = train_bpe(CORPUS, vocab_size=350, progress=False)
    second = train_bpe(iter(CORPUS), vocab_size=350, progress=False)
    assert first == second


def test_small_text_stops_early_instead_of_failing():
    merges = train_bpe(["ab"], vocab_size=1000, progress=False)
    assert merges == [(97, 98)]


# --- pre-tokenization ----------------------------------------------------------

def test_split_pattern_examples():
    assert regex.findall(SPLIT_PATTERN, "Hello world's 12345!!\n\n") == \
        ["Hello", " world", "'s", " ", "123", "45", "!!\n\n"]
    # each Han character is its own chunk; CJK punctuation never sticks to a word
    assert regex.findall(SPLIT_PATTERN, "春天来了，hello。") == ["春", "天", "来", "了", "，", "hello", "。"]


def test_split_is_identical_in_regex_and_tiktoken():
    # Give tiktoken every chunk that `regex` finds as a token: if both engines cut
    # the text the same way, tiktoken returns exactly those chunks.
    texts = TRICKY + [ENGLISH, CHINESE] + _random_texts(500, seed=1)
    chunks = {c.encode() for t in texts for c in regex.findall(SPLIT_PATTERN, t)}
    ranks = {bytes([i]): i for i in range(256)}
    for c in sorted(chunks - set(ranks)):
        ranks[c] = len(ranks)
    enc = tiktoken.Encoding("split-check", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for t in texts:
        got = [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(t)]
        assert got == [c.encode() for c in regex.findall(SPLIT_PATTERN, t)], t


def test_han_characters_are_never_merged_across_characters():
    text = CHINESE * 50
    tok = Tokenizer.from_texts([text], vocab_size=600, progress=False)
    whole_chars = {tok.decode_bytes([i]).decode("utf-8", errors="ignore") for i in range(tok.vocab_size)}
    assert {"我", "们", "分", "词"} <= whole_chars          # frequent characters became tokens
    # no token holds bytes of two different characters when a Han character is involved
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode()]
    start = 0
    for token_id in tok.encode(text):
        end = start + len(tok.decode_bytes([token_id]))
        chars = {text[char_of_byte[k]] for k in range(start, end)}
        if any(regex.match(r"\p{Han}", ch) for ch in chars):
            assert len(set(char_of_byte[start:end])) == 1, tok.decode_bytes([token_id])
        start = end


# --- encoding and decoding -----------------------------------------------------

@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_round_trip_every_code_point_of_the_bmp(tok):
    text = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
    assert tok.decode(tok.encode(text)) == text


def test_tiktoken_encoding_equals_reference_encoder(tok):
    texts = TRICKY + [ENGLISH, CHINESE] + _random_texts(300, seed=2)
    for text in texts:
        assert tok.encode_ordinary(text) == encode_reference(text, tok.merges, tok.pattern), text


def test_encode_batch_equals_encode(tok):
    texts = TRICKY + [ENGLISH, CHINESE]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_of_a_cut_character_gives_replacement_char(tok):
    ids = tok.encode("龥")                          # a rare character: several byte-level tokens
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"


def test_token_bytes_sum_to_the_utf8_length(tok):
    text = ENGLISH + CHINESE + "🙂\x00\r\n"
    ids = tok.encode(text)
    assert tok.token_bytes.dtype == np.int32
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert all(tok.token_bytes[i] == 0 for i in tok.special_ids.values())


# --- special tokens ------------------------------------------------------------

def test_special_tokens_take_the_last_ids(tok):
    v = tok.vocab_size
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id) == (v - 3, v - 2, v - 1)
    assert tok.special_ids == {"<|endoftext|>": v - 3, "<|im_start|>": v - 2, "<|im_end|>": v - 1}


def test_special_token_text_is_ordinary_text_by_default(tok):
    ids = tok.encode("hi<|im_end|>")
    assert tok.im_end_id not in ids                  # a user cannot forge the end of a turn
    assert tok.decode(ids) == "hi<|im_end|>"


def test_special_tokens_encoded_only_when_allowed(tok):
    text = "<|im_start|>user<|im_end|>"
    assert tok.encode(text, allowed_special="all") == \
        [tok.im_start_id] + tok.encode("user") + [tok.im_end_id]
    only_start = tok.encode(text, allowed_special={"<|im_start|>"})
    assert only_start[0] == tok.im_start_id and tok.im_end_id not in only_start
    assert tok.decode(only_start) == text


# --- files ---------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_ids == tok.special_ids
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(ENGLISH + CHINESE) == tok.encode(ENGLISH + CHINESE)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "workshop-bpe-v1" and saved["vocab_size"] == 400


def test_fingerprint_is_stable_and_tracks_the_merges(tok):
    assert Tokenizer(tok.merges).fingerprint == tok.fingerprint
    assert Tokenizer(tok.merges[:-1]).fingerprint != tok.fingerprint
    assert len(tok.fingerprint) == 16


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope\.json not found: run `python -m tokenizer\.train"):
        Tokenizer.load(path)


@pytest.mark.parametrize("content", ["{not json", '{"format": "something-else"}', '{"format": "workshop-bpe-v1"}', "[]"])
def test_corrupt_file_gives_one_clear_line(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json is not a valid tokenizer file .*: delete it and run") as e:
        Tokenizer.load(path)
    assert "\n" not in str(e.value)


def test_train_on_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text(ENGLISH * 10, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": line}, ensure_ascii=False) for line in CHINESE.splitlines() * 10),
        encoding="utf-8")
    out = tmp_path / "out" / "tok.json"
    tok = train_tokenizer_on_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], 300, out, progress=False)
    assert tok.vocab_size == 300
    assert Tokenizer.load(out).fingerprint == tok.fingerprint


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object with a \"text\" string"):
        train_tokenizer_on_files([path], 300, tmp_path / "t.json", progress=False)


def test_missing_training_file_is_reported_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: file not found"):
        train_tokenizer_on_files([tmp_path / "missing.txt"], 300, tmp_path / "t.json", progress=False)


def _random_texts(n, seed):
    """Random strings over a pool that exercises every branch of the split pattern."""
    pool = list("aZ éß'sltd 0123456789\t\n\r\x00\x1c\x85\u00a0\u3000，。「」！？,.!?;:\"-_()你好世界〇々🙂👍🏽\u0301\u200dＡ１")
    pool += ["'s", "'LL", " the", "\r\n", "<|im_end|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# --- the command: `python -m tokenizer.train` never replaces a tokenizer it was not told to ---

def test_train_command_writes_a_new_file_by_default_not_the_projects_tokenizer(tmp_path, monkeypatch):
    import tokenizer.train as train_cli
    from tokenizer import DEFAULT_TOKENIZER_PATH
    assert Path(train_cli.DEFAULT_OUT_PATH).resolve() != DEFAULT_TOKENIZER_PATH
    (tmp_path / "a.txt").write_text(ENGLISH * 10, encoding="utf-8")
    monkeypatch.setattr(train_cli, "DEFAULT_OUT_PATH", tmp_path / "trained.json")
    train_cli.main(["--input", str(tmp_path / "a.txt"), "--vocab_size", "280", "--quiet"])
    assert Tokenizer.load(tmp_path / "trained.json").vocab_size == 280


def test_train_command_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    import tokenizer.train as train_cli
    (tmp_path / "a.txt").write_text(ENGLISH * 10, encoding="utf-8")
    out = tmp_path / "tok.json"
    out.write_text("keep me")
    args = ["--input", str(tmp_path / "a.txt"), "--vocab_size", "280", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as refused:
        train_cli.main(args)
    message = str(refused.value.code)
    assert f"{out} already exists" in message and "--overwrite" in message and "\n" not in message
    assert out.read_text() == "keep me"
    train_cli.main(args + ["--overwrite"])
    assert Tokenizer.load(out).vocab_size == 280
    assert f"saved {out}" in capsys.readouterr().out
