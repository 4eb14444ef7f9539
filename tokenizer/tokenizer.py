"""
The run-time tokenizer: the merges learned by bpe.py, run by tiktoken.

tiktoken wants two things: the split regex, and `mergeable_ranks`, a dict
{token bytes: rank}. Our rank is simply the token id: bytes 0..255, then merge
i makes token 256 + i whose bytes are bytes(a) + bytes(b). tiktoken then
encodes exactly like `bpe.encode_reference`, in Rust, on several threads.

Special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) come right after the
merges, so they are the last ids of the vocabulary. They are never produced by
encoding ordinary text: someone typing "<|im_end|>" into a chat must not be able
to end the assistant's turn. Code that builds prompts asks for them explicitly
(`allowed_special=...`) or inserts their ids directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import tiktoken

from atomic import atomic_write_text

from .bpe import N_BYTES, SPLIT_PATTERN, merges_to_vocab, train_bpe

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FILE_FORMAT = "workshop-bpe-v1"
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent / "default.json"  # built by the pipeline, git-ignored


class Tokenizer:
    """Byte-level BPE tokenizer: ids 0..255 are bytes, then the merges, then the special tokens."""

    def __init__(self, merges: Sequence[Sequence[int]], pattern: str = SPLIT_PATTERN,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.special_tokens = tuple(special_tokens)

        for i, (a, b) in enumerate(self.merges):   # a merge can only use tokens that exist before it
            if not (0 <= a < N_BYTES + i and 0 <= b < N_BYTES + i):
                raise ValueError(f"merge {i} ({a}, {b}) refers to a token that does not exist yet")
        vocab = merges_to_vocab(self.merges)
        ranks: dict[bytes, int] = {}
        for rank, token in enumerate(vocab):
            if token in ranks:
                raise ValueError(f"token {rank} has the same bytes {token!r} as token {ranks[token]}")
            ranks[token] = rank

        n_ordinary = len(vocab)
        self.special_ids = {name: n_ordinary + i for i, name in enumerate(self.special_tokens)}
        self._enc = tiktoken.Encoding(
            name=f"workshop-bpe-{self.fingerprint}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
            explicit_n_vocab=n_ordinary + len(self.special_tokens),
        )
        # How many bytes of text each token stands for; special tokens stand for none.
        # Bits per byte = (sum of losses in nats) / ln 2 / (sum of token_bytes[targets]).
        self.token_bytes = np.array([len(t) for t in vocab] + [0] * len(self.special_tokens), dtype=np.int32)

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
                   special_tokens: Sequence[str] = SPECIAL_TOKENS, verbose: bool = False,
                   progress: bool = True) -> "Tokenizer":
        """Train BPE on `texts` (see bpe.train_bpe) and build a tokenizer of `vocab_size` tokens."""
        merges = train_bpe(texts, vocab_size, pattern=pattern, n_special=len(special_tokens),
                           verbose=verbose, progress=progress)
        return cls(merges, pattern=pattern, special_tokens=special_tokens)

    # --- sizes and ids --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self.special_ids["<|endoftext|>"]

    @property
    def im_start_id(self) -> int:
        return self.special_ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self.special_ids["<|im_end|>"]

    @property
    def fingerprint(self) -> str:
        """Short hash of everything that decides the ids: two tokenizers with the
        same fingerprint encode every text the same way. A checkpoint stores it, so
        pairing a model with the wrong tokenizer is caught instead of producing
        fluent nonsense."""
        if not hasattr(self, "_fingerprint"):
            blob = json.dumps({"pattern": self.pattern, "merges": self.merges,
                               "special_tokens": list(self.special_tokens)}, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    # --- encoding and decoding ------------------------------------------------

    def _special_args(self, allowed_special) -> dict:
        """Map our `allowed_special` onto tiktoken's arguments.

        "none": special-token text is encoded as ordinary text (the safe default;
        tiktoken's own default would raise an error instead). "all": every special
        token string becomes its id. A set: only those do; others stay ordinary text.
        """
        if allowed_special == "all":
            return {"allowed_special": "all"}
        if allowed_special == "none":
            return {"allowed_special": set(), "disallowed_special": ()}
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; known: {list(self.special_tokens)}")
        return {"allowed_special": set(allowed_special), "disallowed_special": ()}

    def encode(self, text: str, allowed_special="none") -> list[int]:
        """Text -> token ids. allowed_special: "none" (default), "all", or a set of special token strings."""
        if allowed_special == "none":
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, **self._special_args(allowed_special))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> token ids, treating special-token text as plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allowed_special="none",
                     num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts on several threads (tiktoken releases the GIL); default: one per core, up to 8."""
        num_threads = num_threads or min(8, os.cpu_count() or 1)
        if allowed_special == "none":
            return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return self._enc.encode_batch(list(texts), num_threads=num_threads, **self._special_args(allowed_special))

    def decode_bytes(self, ids) -> bytes:
        """Token ids -> the exact bytes (special tokens decode to their text)."""
        return self._enc.decode_bytes(_as_int_list(ids))

    def decode(self, ids) -> str:
        """Token ids -> text. A cut in the middle of a UTF-8 character becomes U+FFFD."""
        return self._enc.decode(_as_int_list(ids), errors="replace")

    # --- saving and loading ---------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FILE_FORMAT, "vocab_size": self.vocab_size, "pattern": self.pattern,
                "special_tokens": dict(self.special_ids), "merges": [list(m) for m in self.merges]}

    def save(self, path) -> None:
        """Write one JSON file (atomically: a crash never leaves half a file)."""
        path = Path(path)
        d = self.to_dict()
        merges = d.pop("merges")
        head = json.dumps(d, ensure_ascii=False, indent=1)[:-2]  # drop the closing "\n}"
        body = ",\n".join(f"  [{a}, {b}]" for a, b in merges)   # one merge per line: readable, diffable
        atomic_write_text(path, f'{head},\n "merges": [\n{body}\n ]\n}}\n')

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        specials = sorted(d["special_tokens"].items(), key=lambda kv: kv[1])
        tok = cls(d["merges"], pattern=d["pattern"], special_tokens=[name for name, _ in specials])
        if tok.special_ids != d["special_tokens"] or tok.vocab_size != d["vocab_size"]:
            raise ValueError("special token ids or vocab_size do not match the merges")
        return tok

    @classmethod
    def load(cls, path=DEFAULT_TOKENIZER_PATH) -> "Tokenizer":
        """Read a file written by `save` (tokenizer.load_tokenizer reads imported vocabularies too)."""
        return read_tokenizer_file(path, {FILE_FORMAT: cls.from_dict})

    # Rebuild from merges when pickled (e.g. sent to DataLoader worker processes).
    def __getstate__(self):
        return {"merges": self.merges, "pattern": self.pattern, "special_tokens": self.special_tokens}

    def __setstate__(self, state):
        self.__init__(state["merges"], state["pattern"], state["special_tokens"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, fingerprint={self.fingerprint})"


def read_tokenizer_file(path, builders: dict[str, Callable[[dict], Tokenizer]]) -> Tokenizer:
    """Read a tokenizer JSON file and build it with the builder for its "format".

    A missing or damaged file gives a one-line error saying what to do.
    """
    path = Path(path)
    if path.resolve() == DEFAULT_TOKENIZER_PATH:
        rebuild = "run `python pretrain.py` (or `python -m tokenizer.train --out tokenizer/default.json`)"
    else:
        rebuild = f"run `python -m tokenizer.train --input FILE... --out {path}`"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {rebuild}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        if found not in builders:
            raise ValueError(f"format is {found!r}, expected " + " or ".join(f'"{f}"' for f in builders))
        return builders[found](d)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        reason = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ValueError(f"{path} is not a valid tokenizer file ({reason}): delete it and {rebuild}") from None


def _as_int_list(ids) -> list[int]:
    """Accept a list, a numpy array or a torch tensor of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
