"""
pipeline.py -- the whole workshop in one command: tokenizer -> pretrain -> SFT -> LoRA -> DPO -> evaluation.

    python pipeline.py                      # every stage with its defaults (~12 min on 2 CPU cores)
    python pipeline.py --overwrite          # retrain every stage, even those already done
    python pipeline.py --stages sft lora    # only some stages (the ones before must be done)

Each stage runs as its own process with exactly the command a learner would type
(`python pretrain.py`, `python full_sft.py`, ...), so the pipeline shows nothing the
stages do not. A stage whose output folder already holds its metrics.json is kept, not
retrained, and a stage cut off midway resumes from its last evaluation (resume.pt):
an interrupted pipeline picks up where it stopped. At the end every
checkpoint also takes the multiple-choice test (evaluation.py), and one table gathers
every stage's numbers; it is printed and written to weight/pipeline.md and .json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from atomic import atomic_write_text
from flags import arg, main_guard, parse_config
from weight.checkpoint import ADAPTER_FILE, RESUME_FILE, ROOT, WEIGHTS_FILE

# stage -> (command, output folder); each stage reads the previous stage's folder by default
STAGES = {
    "pretrain": (["pretrain.py"], "weight/pretrain"),         # also builds the corpus and trains the tokenizer
    "sft": (["full_sft.py"], "weight/sft"),
    "lora": (["lora.py"], "weight/lora"),
    "dpo": (["dpo.py"], "weight/dpo"),
}
# checkpoints that take the multiple-choice test at the end (the LoRA one is base + adapter)
EVALUATED = {"pretrain": ["--ckpt", "weight/pretrain"], "sft": ["--ckpt", "weight/sft"],
             "lora": ["--lora", "weight/lora"], "dpo": ["--ckpt", "weight/dpo"]}
REPORT_DIR = "weight/eval"
PROGRESS_BAR = re.compile(r"\d+%\|")                    # a tqdm bar: "sft:  11%|█▏  | 226/2000 ..."


@dataclass
class PipelineConfig:
    stages: tuple = arg(tuple(STAGES) + ("eval",), "stages to run, in order", nargs="+", type=str)
    overwrite: bool = arg(False, "retrain stages whose output already exists")
    device: str = arg("auto", "passed to every stage", choices=["auto", "cpu", "cuda", "mps"])


def run_stage(name: str, command: list[str], log_path: Path) -> float:
    """Run one stage as `python <command>`, its output shown live and kept in a log; returns seconds."""
    print(f"\n=== {name}: python {' '.join(command)}", flush=True)
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        for line in process.stdout:                # bytes up to each "\n"
            log.write(line)
            text = line.decode("utf-8", errors="replace").split("\r")[-1]   # what a terminal would leave
            if text.strip() and not PROGRESS_BAR.search(text):             # progress bars go to the log only
                print(text, end="" if text.endswith("\n") else "\n", flush=True)
        if process.wait() != 0:
            raise ValueError(f"stage {name} failed (exit {process.returncode}): see {log_path}; "
                             f"fix it and rerun `python pipeline.py` (finished stages are kept)")
    return time.time() - started


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(results: dict) -> str:
    """Markdown tables: each stage's headline numbers with the targets, then accuracy per task family."""
    pre, sft, lora, dpo = (results.get(s, {}) for s in ("pretrain", "sft", "lora", "dpo"))
    choice = results.get("choice", {})
    seconds = results.get("seconds", {})

    def check(ok) -> str:
        return "" if ok is None else ("yes" if ok else "**no**")

    def wall(stage):
        return f"{seconds[stage]:.0f} s" if stage in seconds else "kept"

    rows = [("stage", "measured", "result", "target met", "wall")]
    if pre:
        rows.append(("pretrain", "val bits per byte (en / zh)",
                     f"{pre['val_bpb']:.3f} ({pre['val_bpb_en']:.3f} / {pre.get('val_bpb_zh', float('nan')):.3f})",
                     check(pre["val_bpb_en"] <= 2.3), wall("pretrain")))
    if sft:
        rows.append(("sft", "held-out exact match", f"{pct(sft['accuracy_before'])} -> {pct(sft['accuracy'])}",
                     check(sft["accuracy"] >= 0.5), wall("sft")))
    if lora:
        old_drop = (lora["old_skills_accuracy_before"] or 0) - (lora["old_skills_accuracy"] or 0)
        rows.append(("lora", "new skill; old skills; trainable",
                     f"{pct(lora['new_skill_accuracy_before'])} -> {pct(lora['new_skill_accuracy'])}; "
                     f"{pct(lora['old_skills_accuracy_before'])} -> {pct(lora['old_skills_accuracy'])}; "
                     f"{pct(lora['trainable_fraction'])}",
                     check(lora["new_skill_accuracy"] >= 0.6 and old_drop <= 0.10 and lora["trainable_fraction"] < 0.05),
                     wall("lora")))
    if dpo:
        rows.append(("dpo", "preference accuracy; margin; task accuracy",
                     f"{pct(dpo['preference_accuracy'])}; {dpo['reward_margin']:.2f}; "
                     f"{pct(dpo['accuracy_before'])} -> {pct(dpo['accuracy'])}",
                     check(dpo["preference_accuracy"] >= 0.8 and dpo["accuracy"] >= dpo["accuracy_before"]),
                     wall("dpo")))
    if choice:
        rows.append(("eval", "multiple choice per byte (chance " + pct(next(iter(choice.values()))["chance"]) + ")",
                     ", ".join(f"{k} {pct(v['accuracy_norm'])}" for k, v in choice.items()), "", wall("eval")))
    lines = [markdown_table(rows)]

    # accuracy per task family for every checkpoint: where each stage gained or lost
    columns = [("pretrain", sft.get("accuracy_by_family_before")), ("sft", sft.get("accuracy_by_family")),
               ("lora", lora.get("accuracy_by_family")), ("dpo", dpo.get("accuracy_by_family"))]
    columns = [(name, dict(fam)) for name, fam in columns if fam]
    families = sorted({f for _, fam in columns for f in fam})
    for name, fam in columns:                              # multiple-choice families, per byte
        for f, a in choice.get(name, {}).get("accuracy_norm_by_family", {}).items():
            fam[f"choice: {f}"] = a
    families += sorted({f"choice: {f}" for r in choice.values() for f in r["accuracy_norm_by_family"]})
    if columns:
        rows = [("task family",) + tuple(name for name, _ in columns)]
        rows += [(f,) + tuple(pct(fam.get(f)) for _, fam in columns) for f in families]
        lines.append(markdown_table(rows))
    total = sum(seconds.values())
    lines.append(f"pipeline wall time: {total / 60:.1f} min for the stages run now ({', '.join(seconds) or 'none'})")
    return "\n\n".join(lines)


def markdown_table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"   # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])


def main(argv=None):
    cfg = parse_config(PipelineConfig, __doc__.split("\n\n")[0].strip(), argv)
    unknown = set(cfg.stages) - set(STAGES) - {"eval"}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGES)}, eval")
    logs = ROOT / REPORT_DIR
    logs.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, (command, out_dir) in STAGES.items():
        if name not in cfg.stages:
            continue
        folder = ROOT / out_dir
        done = (folder / "metrics.json").exists()
        if done and not cfg.overwrite:
            print(f"=== {name}: {out_dir}/metrics.json exists, kept (--overwrite retrains it)")
            continue
        extra = ["--device", cfg.device]
        if not cfg.overwrite and (folder / RESUME_FILE).exists():
            extra.append("--resume")           # cut off midway: go on from its last evaluation
        elif cfg.overwrite or any((folder / f).exists() for f in (WEIGHTS_FILE, ADAPTER_FILE)):
            extra.append("--overwrite")        # retrain (or, with nothing to resume from, start over)
        seconds[name] = run_stage(name, command + extra, logs / f"{name}.log")

    choice = {}
    if "eval" in cfg.stages:
        started = time.time()
        for name, which in EVALUATED.items():
            if not (ROOT / STAGES[name][1]).exists():
                continue
            out = logs / f"choice_{name}.json"
            run_stage(f"eval {name}", ["evaluation.py", *which, "--tasks", "choice", "--device", cfg.device,
                                       "--out", str(out)], logs / f"eval_{name}.log")
            choice[name] = read_json(out)["choice"]
        seconds["eval"] = time.time() - started

    results = {name: read_json(ROOT / out_dir / "metrics.json") for name, (_, out_dir) in STAGES.items()}
    results.update(choice=choice, seconds=seconds)
    table = summary_table(results)
    print("\n" + table)
    atomic_write_text(ROOT / "weight" / "pipeline.md", table + "\n")
    atomic_write_text(ROOT / "weight" / "pipeline.json", json.dumps(results, indent=2, ensure_ascii=False))
    print("\n-> weight/pipeline.md, weight/pipeline.json")


if __name__ == "__main__":
    main_guard(main)
