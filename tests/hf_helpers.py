"""Shared by test_hf_tokenizer.py and test_hf_import.py: small Hugging Face folders made on the spot.

Tokenizers are trained with the `tokenizers` library (the reference implementation), models
are random transformers models saved as safetensors: nothing is downloaded.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from tokenizer.hf import QWEN2_PATTERN

# English, Chinese, code, emoji, whitespace runs, digits, a decomposed accent (NFC matters)
MIXED = ("Hello world! It's 2024: naïve café, e\u0301 decomposed, don't WE'LL.\n"
         "    def f(x):\n\treturn x ** 2  # code, tabs\n"
         "我们今天学习分词器。床前明月光，疑是地上霜。Python写代码，hello世界！\n"
         "emoji 🙂👍🏽 👨‍👩‍👧 🇨🇳  1234567 tokens\r\n\n\n  end   ")
TOY_TEXT = [MIXED, "the cat sat on the mat and the dog ate the log 12 345", "你好世界 我们 学习 分词 代码"] * 40


def write_toy_tokenizer(folder: Path, style: str, vocab_size: int = 300, specials=("<|endoftext|>",),
                        files: str = "tokenizer.json", tokenizer_class: str = "PreTrainedTokenizerFast",
                        chat_template: str | None = None) -> int:
    """Train a byte-level BPE with the `tokenizers` library and write it as a model folder would hold it.

    style "gpt2": GPT-2's regex inside ByteLevel; "qwen2": Split(Qwen2 regex) + ByteLevel + NFC.
    files "tokenizer.json" or "vocab+merges" (vocab.json + merges.txt). Returns the number of tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TOY_TEXT, trainer)
    tok.add_special_tokens(list(specials))
    folder.mkdir(parents=True, exist_ok=True)
    if files == "tokenizer.json":
        tok.save(str(folder / "tokenizer.json"))
    else:
        tok.model.save(str(folder))      # vocab.json + merges.txt (the added tokens go in the config below)
    config = {"tokenizer_class": tokenizer_class, "eos_token": specials[0],
              "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True} for s in specials}}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tok.get_vocab_size()


def package_file(package: str, *parts: str) -> Path:
    """A data file that a registry package ships (set-up installs them); skip if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (setup.sh installs it)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path
