"""
report.py -- the report card of a pipeline run: one page, weight/report.html, showing what every stage did.

`python pipeline.py` writes it at the end of every run (the same run that prints the table), from
what the stages left in weight/: each stage's curves (the loss.png it drew), metrics.json (accuracy per task
family, sample answers before and after), the tokenizer, the machine and the times. The pictures
are drawn with matplotlib and embedded in the page as base64 PNG, so the one file opens anywhere,
offline, and can be archived or mailed with a run.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path

from atomic import atomic_write_text
from runtime import machine_line
from tokenizer import Tokenizer

STAGE_FOLDERS = ("pretrain", "sft", "lora", "dpo", "grpo")          # under weight/, in pipeline order
STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:14px}th{background:#f3f3f3}img{max-width:100%}.ok{color:#17803d}.bad{color:#c0392b}
pre{margin:0;white-space:pre-wrap;font-family:inherit}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def pyplot():
    import matplotlib
    matplotlib.use("Agg")              # no screen: draw into memory
    import matplotlib.pyplot as plt
    return plt


def picture(fig, alt: str) -> str:
    """The figure as an <img> whose data is the PNG itself: the page needs no other file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[tuple]) -> str:
    """rows[0] is the header; cells are escaped, so answers show exactly what the model wrote."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


class Markup(str):
    """A table cell that is already HTML (a coloured mark), not text to escape."""


def missed(cell):
    """The printed table marks a missed target **no** (markdown): here it is red."""
    return Markup('<b class="bad">no</b>') if cell == "**no**" else cell


def stage_picture(path: Path) -> str:
    """A picture a stage drew itself (loss.png: its curves from log.csv; grpo.png), embedded as it is."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.parent.name)} {html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def family_chart(columns: list[tuple[str, dict]]) -> str:
    """Held-out exact match per task family, one bar per checkpoint: where each stage gained or lost."""
    plt = pyplot()
    families = sorted({f for _, accuracy in columns for f in accuracy})
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(families) * len(columns) ** 0.5 + 1.2))
    height = 0.8 / len(columns)
    for i, (name, accuracy) in enumerate(columns):
        ax.barh([j + i * height for j in range(len(families))], [100 * accuracy.get(f, 0) for f in families],
                height=height, label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(families))], families)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("held-out exact match (%)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return picture(fig, "accuracy per task family")


def times_chart(seconds: dict, estimate: dict) -> str:
    plt = pyplot()
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1))
    ax.barh(names, [seconds[n] / 60 for n in names], label="measured")
    ax.scatter([estimate[n] / 60 for n in names if n in estimate], [n for n in names if n in estimate],
               color="black", marker="|", s=300, label="estimated before the run")
    ax.invert_yaxis()
    ax.set_xlabel("minutes")
    ax.legend(loc="lower right", fontsize=8)
    return picture(fig, "stage times")


def tokenizer_section(tokenizer: Tokenizer, samples: dict[str, str]) -> str:
    """Vocabulary, special tokens, bytes per token on each language's validation text, the longest tokens."""
    rows = [("measure", "value"), ("vocabulary", f"{tokenizer.vocab_size:,} tokens (256 bytes + merges + specials)"),
            ("special tokens", ", ".join(sorted(tokenizer.special_tokens)))]
    for language, text in samples.items():
        n_bytes = len(text.encode("utf-8"))
        rows.append((f"bytes per token, {language}", f"{n_bytes / max(1, len(tokenizer.encode(text))):.2f} "
                                                     f"(on {n_bytes:,} bytes of validation text)"))
    pieces = [tokenizer.decode_bytes([i]) for i in range(256, tokenizer.vocab_size - len(tokenizer.special_tokens))]
    longest = sorted(pieces, key=len, reverse=True)[:12]
    rows.append(("longest tokens", "  ".join(repr(p.decode("utf-8", errors="replace")) for p in longest)))
    return table(rows)


def examples_table(metrics: dict) -> str:
    """The first held-out prompts of each family: the answer before the stage and after it."""
    after = metrics.get("examples") or []
    before = {e["prompt"]: e for e in metrics.get("examples_before") or []}

    def mark(e):
        return Markup(f'<span class="{"ok" if e["correct"] else "bad"}">{"right" if e["correct"] else "wrong"}</span>')

    rows = [("family", "prompt", "expected", "before", "", "after", "")]
    for e in after:
        b = before.get(e["prompt"])
        rows.append((e["family"], Markup(f"<pre>{html.escape(e['prompt'])}</pre>"),
                     Markup(f"<pre>{html.escape(e['expected'])}</pre>"),
                     Markup(f"<pre>{html.escape(b['answer'])}</pre>") if b else "-", mark(b) if b else "",
                     Markup(f"<pre>{html.escape(e['answer'])}</pre>"), mark(e)))
    return table(rows)


def write_report(path: Path, results: dict, tables: list[list[tuple]], weight_dir: Path, device: str, dtype: str,
                 tokenizer: Tokenizer | None = None, samples: dict[str, str] | None = None) -> Path:
    """results: what pipeline.json holds (each stage's metrics, choice, seconds, estimate);
    tables: the pipeline's summary tables as rows (the same numbers it prints)."""
    seconds, estimate = results.get("seconds", {}), results.get("estimate", {})
    parts = [f"<h1>Report card</h1><p>{datetime.now():%Y-%m-%d %H:%M} &middot; "
             f"{html.escape(machine_line(device, dtype))} &middot; "
             f"{sum(seconds.values()) / 60:.1f} min for the stages run now</p>",
             "<h2>Every stage against its target</h2>", table([tuple(missed(c) for c in row) for row in tables[0]])]

    parts.append("<h2>Training curves</h2>")     # each stage's own pictures (training.plot_log, grpo.py)
    for folder in STAGE_FOLDERS:
        parts += [stage_picture(weight_dir / folder / name) for name in ("loss.png", "grpo.png")
                  if (weight_dir / folder / name).exists()]

    columns = [(f"{name} ({when})", metrics[key]) for name, metrics, key, when in
               [("sft", results.get("sft", {}), "accuracy_by_family_before", "before: pretrained")] +
               [(s, results.get(s, {}), "accuracy_by_family", "after") for s in ("sft", "lora", "dpo", "grpo")]
               if metrics.get(key)]
    if columns:
        parts += ["<h2>Held-out exact match per task family</h2>", family_chart(columns)]
        if len(tables) > 1:
            parts.append(table(tables[1]))

    parts.append("<h2>Sample answers, before and after each stage</h2>")
    for stage in ("sft", "dpo", "grpo"):
        if results.get(stage, {}).get("examples"):
            parts += [f"<h3>{stage}</h3>", examples_table(results[stage])]
    if results.get("lora", {}).get("examples"):
        parts += ["<h3>lora (the new skill)</h3>", examples_table(results["lora"])]

    if tokenizer is not None:
        parts += ["<h2>The tokenizer</h2>", tokenizer_section(tokenizer, samples or {})]
    if seconds:
        parts += ["<h2>Time</h2>", times_chart(seconds, estimate)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Report card</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_text(path, page)
    return path
