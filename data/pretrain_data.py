"""
Pretraining data: text files -> token ids in memory-mapped .bin files -> random batches.

    read_documents(path)    stream a .txt (in ~1 MB pieces cut at line ends) or a .jsonl
                            with {"text": ...} per line (the minimind pretraining format)
    tokenize_to_bin(...)    encode once, append ids to a .bin (uint16 if the vocabulary
                            fits in 65,536 ids, else uint32); files larger than memory work
    prepare_dataset(...)    the whole step for a set of splits, cached by tokenizer fingerprint
    TokenBin                np.memmap over a .bin: random training windows, eval windows
    prepare_pretraining_data(...)   what pretrain.py calls: the default corpus or the
                            user's files -> a tokenizer (trained if missing) -> .bin files

Every document ends with <|endoftext|>, so the model learns where texts stop.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from atomic import atomic_path, atomic_write_text
from tokenizer import Tokenizer, load_tokenizer, train_tokenizer_on_files

from .corpus import build_default_corpus
from .corpus_tasks import DEFAULT_DIR

CHUNK_BYTES = 1 << 20          # .txt files are read and encoded in pieces of about 1 MB
JSONL_VAL_EVERY_NTH = 100          # user jsonl: every 100th record is held out for validation
TXT_VAL_FRACTION = 0.01        # user .txt: the last 1% of each file is held out
META_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the fix."""


def check_file_has_content(path: Path, folder_hint: str, empty_hint: str = ""):
    """Refuse, in one line, a path that is missing, a folder or an empty file (the hints say what to give)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; {folder_hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty{empty_hint}")


def check_data_file(path: Path):
    """Refuse, in one line, a path that cannot be a text file to train on."""
    check_file_has_content(path, "pass .txt or .jsonl files", "; give a file with text in it")
    if path.suffix not in (".txt", ".jsonl", ".md"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl with {{\"text\": ...}}")


def _decode(raw: bytes, path: Path, line_no: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = "?" if line_no is None else line_no + raw[:e.start].count(b"\n")
        raise DataError(f"{path}:{bad_line}: bytes that are not UTF-8 ({raw[e.start:e.start + 4]!r}); "
                        f"convert the file, e.g. `iconv -f GBK -t UTF-8 in.txt > out.txt`") from None


def read_documents(path: str | Path, part: str = "all") -> Iterator[str]:
    """Yield the text of a file as documents.

    .txt: the file is one document, yielded in ~1 MB pieces cut after a newline.
    .jsonl: one document per line, field "text".
    part="train"/"val" keeps the training or validation part of a user file
    (the last 1% of a .txt, every 100th jsonl record); "all" keeps everything.
    """
    path = Path(path)
    check_data_file(path)
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, part)
    else:
        yield from _read_txt(path, part)


def _read_txt(path: Path, part: str) -> Iterator[str]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        boundary = size                        # train = bytes [0, boundary), val = [boundary, size)
        if part != "all":
            f.seek(int(size * (1 - TXT_VAL_FRACTION)))
            f.readline()                       # move the cut to the next line boundary
            boundary = f.tell()
            if boundary >= size:               # the cut fell in the last line: hold that line out
                tail_start = max(0, size - CHUNK_BYTES)
                f.seek(tail_start)
                last_break = f.read().rstrip(b"\n").rfind(b"\n")
                boundary = tail_start + last_break + 1 if last_break >= 0 else size
        start, end = (boundary, size) if part == "val" else (0, boundary)
        f.seek(start)
        line_no = 1 if start == 0 else None    # line numbers are only known when reading from the top
        offset = start
        while offset < end:
            raw = f.read(min(CHUNK_BYTES, end - offset))
            if not raw:
                return
            if not raw.endswith(b"\n") and offset + len(raw) < end:
                raw += f.readline()            # never cut a line (or a UTF-8 character) in two
            yield _decode(raw, path, line_no)
            if line_no is not None:
                line_no += raw.count(b"\n")
            offset += len(raw)


def _read_jsonl(path: Path, part: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if part != "all" and ((line_no % JSONL_VAL_EVERY_NTH == 0) != (part == "val")):
                continue
            line = _decode(raw, path, line_no)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); each line must be "
                                f'one object like {{"text": "..."}}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{line_no}: no "text" string field; each line must be '
                                f'{{"text": "..."}} (found keys {list(record) if isinstance(record, dict) else type(record).__name__})')
            yield record["text"]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_to_bin(paths: list[Path], tokenizer, out_path: Path, part: str = "all",
                    desc: str = "tokenize") -> dict:
    """Encode documents from `paths` into out_path (written to a temp file, then renamed).

    Returns {"tokens": n, "bytes": b} where b is the UTF-8 size of the text encoded.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = n_bytes = 0
    total = sum(Path(p).stat().st_size for p in paths if Path(p).exists())
    with atomic_path(out_path) as tmp:                 # never leave half a .bin behind
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            for path in paths:
                pieces = list()
                for doc in read_documents(path, part):
                    pieces.append(doc)
                    if sum(len(p) for p in pieces) >= CHUNK_BYTES or len(pieces) >= 1024:
                        n_tokens, n_bytes = _flush(pieces, tokenizer, out, dtype, bar, n_tokens, n_bytes, path)
                        pieces = []
                if pieces:
                    n_tokens, n_bytes = _flush(pieces, tokenizer, out, dtype, bar, n_tokens, n_bytes, path)
                # one <|endoftext|> after each .txt file (jsonl documents get one each, in _flush)
                if Path(path).suffix != ".jsonl":
                    np.array([tokenizer.eot_id], dtype=dtype).tofile(out)
                    n_tokens += 1
        if n_bytes == 0:
            why = (" (held out: the last 1% of each .txt file and every 100th .jsonl record; "
                   "give more text, e.g. at least 100 jsonl records)") if part == "val" else ""
            raise DataError(f"{', '.join(map(str, paths))}: no text for the {part} split{why}")
    return {"tokens": n_tokens, "bytes": n_bytes}


def _flush(pieces, tokenizer, out, dtype, bar, n_tokens, n_bytes, path):
    is_jsonl = Path(path).suffix == ".jsonl"
    for ids, text in zip(tokenizer.encode_batch(pieces), pieces):
        if is_jsonl:
            ids = ids + [tokenizer.eot_id]
        np.asarray(ids, dtype=dtype).tofile(out)
        n_tokens += len(ids)
        size = len(text.encode("utf-8"))
        n_bytes += size
        bar.update(size)
    return n_tokens, n_bytes


def prepare_dataset(splits: dict[str, list[Path]], tokenizer, cache_dir: Path,
                    user_files: bool = False) -> Path:
    """Tokenize each split once into cache_dir/<split>.bin; reuse when nothing changed.

    splits: {"train": [...], "val_en": [...], ...}. With user_files=True every file is
    split into its own train/val parts (see read_documents), giving "train" and "val".
    The cache key covers the tokenizer, file names, sizes and modification times.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted({str(Path(p).resolve()) for ps in splits.values() for p in ps})
    for p in sources:
        check_data_file(Path(p))
    stamp = [tokenizer.fingerprint, META_VERSION, user_files] + [
        (p, os.path.getsize(p), int(os.path.getmtime(p))) for p in sources]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all((cache_dir / f"{s}.bin").exists() for s in meta["splits"]):
            return cache_dir
    if user_files:
        files = splits["train"]
        jobs = {"train": (files, "train"), "val": (files, "val")}
    else:
        jobs = {name: (paths, "all") for name, paths in splits.items()}
    meta = {"key": key, "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name, "sources": sources, "splits": {}}
    for name, (paths, part) in jobs.items():
        meta["splits"][name] = tokenize_to_bin([Path(p) for p in paths], tokenizer,
                                               cache_dir / f"{name}.bin", part, desc=f"tokenize {name}")
    atomic_write_text(meta_path, json.dumps(meta, indent=2))  # written last: its presence means every .bin is complete
    return cache_dir


class TokenBin:
    """Token ids of one split, memory-mapped (the file is never loaded whole) or in memory."""

    def __init__(self, path: Path, dtype, data: np.ndarray | None = None):
        """data: ids already in memory (pretrain.py's chat share); path then only names them in messages."""
        self.path = Path(path)
        self.data = np.memmap(self.path, dtype=dtype, mode="r") if data is None else data

    def __len__(self):
        return len(self.data)

    def random_batch(self, batch_size: int, block_size: int, generator: torch.Generator):
        """x, y (B, T) int64 from random windows; y is x shifted left by one token."""
        if len(self.data) <= block_size + 1:
            raise DataError(f"{self.path}: only {len(self.data)} tokens, fewer than one window of "
                            f"{block_size + 1}; use more text or a smaller --block_size")
        starts = torch.randint(len(self.data) - block_size - 1, (batch_size,), generator=generator)
        x = np.stack([self.data[i:i + block_size] for i in starts.tolist()]).astype(np.int64)
        y = np.stack([self.data[i + 1:i + 1 + block_size] for i in starts.tolist()]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def eval_batches(self, batch_size: int, block_size: int, max_tokens: int | None = None):
        """Yield x, y (b, T) over consecutive non-overlapping windows, from the start.

        Deterministic, so every evaluation scores exactly the same tokens.
        """
        n_windows = (len(self.data) - 1) // block_size
        if n_windows == 0:                     # a split shorter than one window: score it whole
            block_size, n_windows = len(self.data) - 1, 1
        if max_tokens is not None:
            n_windows = min(n_windows, max(1, max_tokens // block_size))
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            x = np.stack([self.data[r * block_size:(r + 1) * block_size] for r in rows]).astype(np.int64)
            y = np.stack([self.data[r * block_size + 1:(r + 1) * block_size + 1] for r in rows]).astype(np.int64)
            yield torch.from_numpy(x), torch.from_numpy(y)


def rows_per_source(batch_size: int, shares: dict[str, float]) -> dict[str, int]:
    """Split batch_size rows among sources in proportion to shares (largest remainder).

    rows_per_source(16, {"en": 0.75, "zh": 0.25}) == {"en": 12, "zh": 4}
    """
    total = sum(shares.values())
    exact = {name: batch_size * share / total for name, share in shares.items()}
    rows = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - rows[name], reverse=True)
    for name in by_remainder[:batch_size - sum(rows.values())]:
        rows[name] += 1
    return rows


class MixedBatches:
    """Random training windows drawn from several TokenBins in fixed proportions.

    With the default corpus, Chinese is about a third of the training tokens; a
    mixture lets a run give English (or any language) a larger share of each batch.
    """

    def __init__(self, bins: dict[str, TokenBin], shares: dict[str, float]):
        if set(bins) != set(shares) or any(s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
            raise ValueError(f"mixture shares {shares} must be >= 0, not all 0, one per source {list(bins)}")
        self.bins, self.shares = bins, shares

    def random_batch(self, batch_size: int, block_size: int, generator: torch.Generator):
        """x, y (B, T): rows from each source as rows_per_source gives, in source order."""
        parts = [self.bins[name].random_batch(n, block_size, generator)
                 for name, n in rows_per_source(batch_size, self.shares).items() if n > 0]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


# ----------------------------------------------------------------------------------
# The whole preparation, for pretrain.py


ROOT = Path(__file__).resolve().parent.parent     # the repository


def prepare_pretraining_data(data: tuple, tokenizer_path: str, vocab_size: int, cache_dir: str, verbose: bool = True):
    """Corpus -> tokenizer -> token .bin files, each step skipped when its result is there.

    data: the user's text files, or () for the default corpus (built from installed packages).
    The tokenizer is trained on the training text if tokenizer_path does not exist (a user
    file's held-out part stays unseen). Returns (tokenizer, train bins, validation bins),
    bins as {split name: TokenBin}: "train"/"val" for user files, "train_en", "val_zh", ...
    for the default corpus.
    """
    if data:
        splits, user_files = {"train": [Path(p) for p in data]}, True
        for path in splits["train"]:
            check_data_file(path)          # before a tokenizer is trained on them
        key = hashlib.sha256("\n".join(sorted(str(Path(p).resolve()) for p in data)).encode()).hexdigest()[:12]
        cache_root = ROOT / cache_dir / key                       # one cache folder per set of user files
    else:
        splits, user_files, cache_root = build_default_corpus(DEFAULT_DIR, verbose), False, DEFAULT_DIR
    tok_path = Path(tokenizer_path)
    if not tok_path.is_absolute():
        tok_path = ROOT / tok_path
    if tok_path.exists():
        tokenizer = load_tokenizer(tok_path)
        if verbose:   # which file, so that a run never silently uses a tokenizer someone replaced
            print(f"tokenizer: {tok_path} ({tokenizer.vocab_size:,} tokens, fingerprint {tokenizer.fingerprint})")
    else:
        if verbose:
            print(f"tokenizer: {tok_path} missing, training a {vocab_size}-token BPE on the training text")
        train_files = [p for name, paths in splits.items() if name.startswith("train") for p in paths]
        if user_files:   # only the training part of each file: validation text stays unseen
            tokenizer = Tokenizer.from_texts((doc for path in train_files for doc in read_documents(path, "train")),
                                             vocab_size)
            tokenizer.save(tok_path)
        else:
            tokenizer = train_tokenizer_on_files(train_files, vocab_size, tok_path)
    bin_dir = prepare_dataset(splits, tokenizer, cache_root / "tokens", user_files=user_files)
    names = ["train", "val"] if user_files else list(splits)
    dtype = token_dtype(tokenizer.vocab_size)
    bins = {name: TokenBin(bin_dir / f"{name}.bin", dtype) for name in names}
    return (tokenizer, {n: b for n, b in bins.items() if n.startswith("train")},
            {n: b for n, b in bins.items() if n.startswith("val")})


def objective_batches(objective: str, config):
    """What pretraining trains on, for model config `config`: next_token (a decoder-only model predicts
    every next token of a window) or next_span (an encoder-decoder reads the first half of a window
    and writes the second). Returns to_batch(x, y) -> the model's inputs and targets; "auto" picks
    the one that fits, and one that does not fit is refused in one line."""
    fits = "next_span" if config.n_encoder_layer else "next_token"
    if objective not in ("auto", fits):
        kind = "an encoder-decoder" if config.n_encoder_layer else "a decoder-only"
        raise ValueError(f"--objective {objective} does not fit {kind} model: use --objective {fits} "
                         f"(or --n_encoder_layer {'0' if config.n_encoder_layer else 'N'} for the other kind)")
    if fits == "next_token":
        return lambda x, y: (x, y)
    return lambda x, y: next_span_batch(x, y, config.decoder_start_id)


def next_span_batch(x: torch.Tensor, y: torch.Tensor, start_id: int):
    """Pretraining an encoder-decoder: windows (x, y = x shifted by one), (B, T) each ->
    (source, decoder input, targets): the encoder reads the first half of each window,
    the decoder writes the second half."""
    window = torch.cat([x[:, :1], y], dim=1)                      # (B, T+1) the whole window
    half = window.shape[1] // 2
    source, targets = window[:, :half], window[:, half:]          # (B, h), (B, T+1-h)
    decoder_input = torch.cat([torch.full_like(targets[:, :1], start_id), targets[:, :-1]], dim=1)
    return source, decoder_input, targets
