"""
Tokenizer: a byte-level BPE learned by our own trainer (bpe.py), run by tiktoken (tokenizer.py).

    from tokenizer import Tokenizer, DEFAULT_TOKENIZER_PATH
    tok = Tokenizer.load(DEFAULT_TOKENIZER_PATH)
    ids = tok.encode("To be, or not to be / 床前明月光")
    text = tok.decode(ids)

Train one: `python -m tokenizer.train --input a.txt b.jsonl --vocab_size 8192 --out tokenizer/my.json`.
Chat: `tokenizer.chat.render_chat(messages, tok)` -> ids and the loss mask (ChatML).
Public vocabularies (GPT-2, Qwen2/Qwen2.5 from Hugging Face files): `tokenizer.hf.load_hf_tokenizer_files(folder)`.
"""

from .bpe import SPLIT_PATTERN, encode_reference, train_bpe
from .tokenizer import DEFAULT_TOKENIZER_PATH, SPECIAL_TOKENS, Tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "SPLIT_PATTERN", "DEFAULT_TOKENIZER_PATH",
           "train_bpe", "encode_reference", "train_tokenizer_on_files"]


def __getattr__(name):
    # train.py is imported on first use rather than here, so that
    # `python -m tokenizer.train` does not find the module already imported
    # (Python warns about running a module that its package already loaded).
    if name == "train_tokenizer_on_files":
        from .train import train_tokenizer_on_files
        return train_tokenizer_on_files
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
