"""
Train a BPE tokenizer on text files and save it as one JSON file.

    python -m tokenizer.train --input a.txt b.jsonl --vocab_size 8192 --out tokenizer/my.json

.txt files are plain UTF-8 text; .jsonl files hold one JSON object per line and
their "text" field is used (the minimind pretraining format). Files are streamed,
never loaded whole. With no --input, the default corpus that `python pretrain.py`
builds (data/default/*_train.txt) is used. With no --out the result goes to
tokenizer/trained.json, never to the project's tokenizer/default.json, and an existing
file is only replaced with --overwrite: a checkpoint's tokens mean nothing under
another tokenizer. Use the new one with `python pretrain.py --tokenizer FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from .tokenizer import Tokenizer

DEFAULT_VOCAB_SIZE = 4096  # the default pipeline's size (pretrain.py --vocab_size); 8192+ for bigger models
DEFAULT_CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "default"  # written by the data pipeline
DEFAULT_OUT_PATH = Path(__file__).resolve().parent / "trained.json"  # not default.json: that one is the project's
TEXT_BLOCK_CHARS = 1_000_000  # .txt files reach the trainer in blocks of about this many characters


class InputError(ValueError):
    """A training file cannot be read; the message names file, line and problem."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, line endings kept exactly as they are."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (bad byte at column {e.start + 1}); "
                                 f"convert the file, e.g. `iconv -f GBK -t UTF-8 in.txt > out.txt`") from None
            yield lineno, (line.lstrip("\ufeff") if lineno == 1 else line)  # drop a byte-order mark


def _txt_blocks(path: Path) -> Iterator[str]:
    """A .txt file in blocks of about TEXT_BLOCK_CHARS characters, cut only before a line that starts
    with a non-space character: no pre-token can span such a cut, so training sees
    exactly the chunks it would see in the whole file."""
    block, size = [], 0
    for _, line in _lines(path):
        if size >= TEXT_BLOCK_CHARS and line[:1] and not line[:1].isspace():
            yield "".join(block)
            block, size = [], 0
        block.append(line)
        size += len(line)
    if block:
        yield "".join(block)


def _jsonl_texts(path: Path, field: str = "text") -> Iterator[str]:
    """The `field` string of every line of a .jsonl file (blank lines skipped)."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputError(f'{path}:{lineno}: expected an object with a "{field}" string, '
                             f'like {{"{field}": "..."}}')
        yield record[field]


def read_texts(paths: Sequence[str | Path], max_bytes: int | None = None) -> Iterator[str]:
    """Stream the texts of .txt / .jsonl files, stopping after about max_bytes UTF-8 bytes."""
    paths = [Path(p) for p in paths]
    for p in paths:  # check every file before spending minutes on the first ones
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found")
    seen = 0
    for p in paths:
        texts = _jsonl_texts(p) if p.suffix == ".jsonl" else _txt_blocks(p)
        for text in texts:
            if max_bytes is not None:
                n = len(text.encode("utf-8"))
                if seen + n >= max_bytes:
                    # keep the part that fits (a character cut in two is dropped)
                    yield text.encode("utf-8")[: max_bytes - seen].decode("utf-8", errors="ignore")
                    return
                seen += n
            yield text


def train_tokenizer_on_files(paths: Sequence[str | Path], vocab_size: int, out_path: str | Path,
                             max_bytes: int | None = None,
                             verbose: bool = False, progress: bool = True) -> Tokenizer:
    """Train a tokenizer of `vocab_size` tokens on files, save it to out_path (atomically), return it."""
    tok = Tokenizer.from_texts(read_texts(paths, max_bytes), vocab_size, verbose=verbose, progress=progress)
    tok.save(out_path)
    return tok


def bytes_per_token(tok: Tokenizer, texts: Iterator[str], batch: int = 64) -> tuple[int, int]:
    """(total UTF-8 bytes, total tokens) of the texts: bytes/token measures compression."""
    n_bytes = n_tokens = 0
    buffer = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == batch:
            n_tokens += sum(map(len, tok.encode_batch(buffer)))
            n_bytes += sum(len(t.encode("utf-8")) for t in buffer)
            buffer = []
    if buffer:
        n_tokens += sum(map(len, tok.encode_batch(buffer)))
        n_bytes += sum(len(t.encode("utf-8")) for t in buffer)
    return n_bytes, n_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer.train",
        description="Train a byte-level BPE tokenizer on .txt / .jsonl files ({\"text\": ...} per line).")
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help=f"training files (default: {DEFAULT_CORPUS_DIR}/*_train.txt, built by `python pretrain.py`)")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="tokens in the vocabulary: 256 bytes + merges + 3 special tokens (default %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT_PATH), help="output JSON file (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max_mb", type=float, default=None, help="train on at most this many MB of text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or merge log")
    args = parser.parse_args(argv)

    paths = args.input or sorted(DEFAULT_CORPUS_DIR.glob("*_train.txt"))
    if not paths:
        sys.exit(f"error: no --input given and no default corpus in {DEFAULT_CORPUS_DIR}: "
                 f"run `python pretrain.py` (builds corpus and tokenizer) or pass --input FILE...")
    if Path(args.out).exists() and not args.overwrite:   # checked before minutes of training, not after
        sys.exit(f"error: {args.out} already exists; pass --overwrite to replace it, or give another --out")
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    try:
        t0 = time.perf_counter()
        tok = train_tokenizer_on_files(paths, args.vocab_size, args.out, max_bytes=max_bytes,
                                       verbose=not args.quiet, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        n_bytes, n_tokens = bytes_per_token(tok, read_texts(paths, max_bytes))
    except (OSError, ValueError) as e:  # missing file, bad line, bad arguments: one line, no traceback
        sys.exit(f"error: {e}")
    print(f"trained {tok.vocab_size:,} tokens on {n_bytes / 1e6:.2f} MB in {seconds:.1f} s; "
          f"{n_bytes / max(n_tokens, 1):.2f} bytes/token on the input; saved {args.out} "
          f"(fingerprint {tok.fingerprint}); use it with `python pretrain.py --tokenizer {args.out}`")


if __name__ == "__main__":
    main()
