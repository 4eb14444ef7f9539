"""
Tokenizer: a byte-level BPE learned by our own trainer (bpe.py), run by tiktoken (tokenizer.py).

    from tokenizer import load_tokenizer
    tok = load_tokenizer()                       # tokenizer/default.json, made by pretrain.py
    ids = tok.encode("To be, or not to be / 床前明月光")
    text = tok.decode(ids)

Train one: `python -m tokenizer.train --input a.txt b.jsonl --vocab_size 8192 --out tokenizer/my.json`.
Chat: `tokenizer.chat.render_chat(messages, tok)` -> ids and the answer mask (ChatML).
Public vocabularies (GPT-2, Qwen2/Qwen2.5 from Hugging Face files): `tokenizer.hf.load_hf_tokenizer_files(folder)`.
`load_tokenizer(path)` reads either kind of file.
"""

from .bpe import SPLIT_PATTERN, encode_reference, train_bpe
from .hf import FORMAT as RANKS_FORMAT
from .hf import PretrainedTokenizer
from .tokenizer import DEFAULT_TOKENIZER_PATH, FILE_FORMAT, SPECIAL_TOKENS, Tokenizer, read_tokenizer_file

__all__ = ["Tokenizer", "PretrainedTokenizer", "load_tokenizer", "SPECIAL_TOKENS", "SPLIT_PATTERN",
           "DEFAULT_TOKENIZER_PATH", "train_bpe", "encode_reference", "train_tokenizer_on_files"]


def load_tokenizer(path=DEFAULT_TOKENIZER_PATH) -> Tokenizer:
    """A tokenizer file: our own BPE (tokenizer.py's format) or an imported vocabulary (hf.py's)."""
    return read_tokenizer_file(path, {FILE_FORMAT: Tokenizer.from_dict, RANKS_FORMAT: PretrainedTokenizer.from_dict})


def __getattr__(name):
    # train.py is imported on first use rather than here, so that
    # `python -m tokenizer.train` does not find the module already imported
    # (Python warns about running a module that its package already loaded).
    if name == "train_tokenizer_on_files":
        from .train import train_tokenizer_on_files
        return train_tokenizer_on_files
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
