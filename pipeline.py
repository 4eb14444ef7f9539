"""
pipeline.py -- the whole workshop in one command: tokenizer -> pretrain -> SFT -> LoRA -> DPO -> evaluation.

    python pipeline.py                      # every stage with its defaults (~22 min on 2 CPU cores in float32)
    python pipeline.py --overwrite          # retrain every stage, even those already done
    python pipeline.py --stages sft lora    # only some stages (the ones before must be done)

Each stage runs as its own process with exactly the command a learner would type
(`python pretrain.py`, `python full_sft.py`, ...), so the pipeline shows nothing the
stages do not. A stage whose output folder already holds its metrics.json is kept, not
retrained, and a stage cut off midway resumes from its last evaluation (resume.pt):
an interrupted pipeline picks up where it stopped. At the end every
checkpoint also takes the multiple-choice test (evaluation.py), and one table gathers
every stage's numbers; it is printed and written to weight/pipeline.md and .json.

Every stage does a fixed amount of work (steps, not seconds), so every machine trains the
same models and prints the same numbers; a slower machine takes longer. Before it starts,
the pipeline times a training step here and says how long the whole run will take, then
shows one progress bar with the time left.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from atomic import atomic_write_text
from data.corpus_tasks import DEFAULT_DIR
from flags import arg, main_guard, parse_config
from model import GPT, ModelConfig
from optim import make_optimizer
from report import write_report
from runtime import resolve_device, resolve_dtype
from scoring import NOISE_P
from training import TrainConfig
from weight.checkpoint import ADAPTER_FILE, RESUME_FILE, ROOT, WEIGHTS_FILE, load_checkpoint_tokenizer

# stage -> (command, output folder); each stage reads the previous stage's folder by default
STAGES = {
    "pretrain": (["pretrain.py"], "weight/pretrain"),         # also builds the corpus and trains the tokenizer
    "sft": (["full_sft.py"], "weight/sft"),
    "lora": (["lora.py"], "weight/lora"),
    "dpo": (["dpo.py"], "weight/dpo"),
    # the reasoning lab, only when asked (--stages pretrain sft_cot grpo eval): SFT on worked answers, then GRPO
    "sft_cot": (["full_sft.py", "--data", "cot", "--max_new_tokens", "64", "--out_dir", "weight/sft_cot"],
                "weight/sft_cot"),
    "grpo": (["grpo.py"], "weight/grpo"),                     # starts from weight/sft_cot
}
DEFAULT_STAGES = ("pretrain", "sft", "lora", "dpo", "eval")
REASONING_STAGES = ("sft_cot", "grpo")
BAR_LABELS = {"sft_cot": "sft"}          # full_sft.py names its progress bar "sft:", whatever its data
# checkpoints that take the multiple-choice test at the end (the LoRA one is base + adapter)
EVALUATED = {"pretrain": ["--ckpt", "weight/pretrain"], "sft": ["--ckpt", "weight/sft"],
             "lora": ["--lora", "weight/lora"], "dpo": ["--ckpt", "weight/dpo"], "sft_cot": ["--ckpt", "weight/sft_cot"],
             "grpo": ["--ckpt", "weight/grpo"]}
REPORT_DIR = "weight/eval"
PROGRESS_BAR = re.compile(r"\d+%\|.*?(\d+)/(\d+)")          # a tqdm bar: "sft:  11%|█▏  | 226/2000 ..."
TARGETS = {"pretrain": "English bpb <= 2.10", "sft": ">= 50%", "lora": "new >= 60%, old within 10 pts, < 5%",
           "dpo": "preference >= 80%, task not below SFT", "sft_cot": ">= 50%",
           "grpo": f"above sft_cot, sign test p < {NOISE_P}"}
# How long each stage took on a reference machine, and how long that machine took for the
# calibration step below: the estimate for this machine scales these by its own calibration step.
# Measured with `python bench/bench_pipeline.py` (bench/results/pipeline-*.json); sft_cot and grpo from a
# `--stages pretrain sft_cot grpo eval` run (593 s and 211 s where the calibration step took 0.98 s).
REFERENCE = {"machine": "2-core AMD EPYC (Zen 3) VM, AVX2, float32", "calibration_seconds": 1.05,
             "seconds": {"pretrain": 457.0, "sft": 589.0, "lora": 104.0, "dpo": 111.0, "eval": 46.0, "sft_cot": 635.0,
                         "grpo": 226.0}}


@dataclass
class PipelineConfig:
    stages: tuple = arg(DEFAULT_STAGES, "stages to run, in order (the reasoning lab's too: --stages pretrain sft lora "
                                        "dpo sft_cot grpo eval)", nargs="+", type=str)
    overwrite: bool = arg(False, "retrain stages whose output already exists")
    device: str = arg("auto", "passed to every stage", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = arg("auto", "passed to every training stage: auto (bf16 on CUDA and on CPUs with bf16 "
                             "instructions, else float32) | float32 | bfloat16", choices=["auto", "float32", "bfloat16"])
    seed: int = arg(1337, "passed to every training stage")
    estimate: bool = arg(True, "time a training step first and say how long the run will take")


def calibration_seconds(device: str, dtype: str) -> float:
    """This machine's speed: the seconds of one training step of the default model on a
    pretraining batch (16 x 256 random tokens, Muon), the fastest of four after two warm-ups
    (the fastest: a busy moment of the machine only ever makes a step slower)."""
    torch.manual_seed(0)
    where = resolve_device(device)
    model = GPT(ModelConfig()).to(where)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), where)
    x = torch.randint(0, model.config.vocab_size, (16, model.config.block_size), device=where)
    autocast = torch.autocast(where.type, resolve_dtype(dtype, where)) if resolve_dtype(dtype, where) != torch.float32 \
        else torch.autocast(where.type, enabled=False)
    times = []
    for _ in range(6):
        started = time.perf_counter()
        with autocast:
            _, loss = model(x, targets=x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if where.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times[2:])


def estimate(stages: list[str], calibration: float) -> dict[str, float]:
    """Seconds each stage should take here: the reference machine's, scaled by the calibration step."""
    return {name: REFERENCE["seconds"][name] * calibration / REFERENCE["calibration_seconds"] for name in stages}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


class Progress:
    """One bar for the whole pipeline, in estimated seconds of work: finished stages count in full,
    the running one by its own progress bar's step count; the time left is the estimate for the
    work that remains, corrected by how fast this run has gone against its estimate so far."""

    def __init__(self, planned: dict[str, float]):
        self.planned, self.done, self.started = planned, 0.0, time.time()
        self.bar = tqdm(total=max(1, round(sum(planned.values()))), unit="s", dynamic_ncols=True,
                        bar_format="pipeline: {percentage:3.0f}%|{bar}| {desc}")

    def update(self, stage: str, fraction: float):
        work = self.done + min(1.0, fraction) * self.planned.get(stage, 0.0)
        total = sum(self.planned.values())
        elapsed = time.time() - self.started
        # real seconds per estimated second so far; trusted once a tenth of the work is done
        pace = elapsed / work if work > 0.1 * total else 1.0
        left = max(0.0, total - work) * pace
        self.bar.n = min(self.bar.total, round(work))
        self.bar.set_description_str(f"{minutes(elapsed)} so far, about {minutes(left)} left ({stage})")

    def finish(self, stage: str):
        self.done += self.planned.get(stage, 0.0)
        self.update(stage, 0.0)

    def write(self, text: str):
        self.bar.write(text.rstrip("\n"))

    def close(self):
        self.bar.close()


def run_stage(name: str, command: list[str], log_path: Path, progress: Callable[[float], None] = lambda f: None,
              show: Callable[[str], None] = lambda text: print(text, flush=True), bar: str = "") -> float:
    """Run one stage as `python <command>`, its output shown live and kept in a log; returns seconds.
    The stage's own progress bars go to the log; their step counts (the bar labelled `bar`, by default
    the stage's name) go to progress(fraction)."""
    show(f"\n=== {name}: python {' '.join(command)}")
    label = bar or name
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        for line in process.stdout:                # bytes up to each "\n"
            log.write(line)
            for piece in line.decode("utf-8", errors="replace").split("\r"):   # what a terminal would draw
                bar = PROGRESS_BAR.search(piece)
                if bar and piece.lstrip().startswith(f"{label}:"):            # the stage's training steps
                    progress(int(bar.group(1)) / max(1, int(bar.group(2))))
                elif piece.strip() and not bar:                                # other bars: the log only
                    show(piece.rstrip("\n"))
        if process.wait() != 0:
            raise ValueError(f"stage {name} failed (exit {process.returncode}): see {log_path}; "
                             f"fix it and rerun `python pipeline.py` (finished stages are kept)")
    return time.time() - started


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def bpb(x) -> str:
    return "-" if x is None else f"{x:.3f}"      # no Chinese corpus installed: no Chinese bpb


def summary_rows(results: dict) -> list[list[tuple]]:
    """Each stage's headline numbers with the targets, then accuracy per task family: tables as rows
    (the first row of each the header), printed as markdown and shown on the report card."""
    pre, sft, lora, dpo, sft_cot, grpo = (results.get(s, {}) for s in ("pretrain", "sft", "lora", "dpo", "sft_cot",
                                                                       "grpo"))
    choice = results.get("choice", {})
    seconds = results.get("seconds", {})

    def check(ok) -> str:
        return "" if ok is None else ("yes" if ok else "**no**")

    def wall(stage):
        return f"{seconds[stage]:.0f} s" if stage in seconds else "kept"

    rows = [("stage", "measured", "result", "target", "met", "wall")]
    if pre:
        rows.append(("pretrain", "val bits per byte (en / zh)",
                     f"{pre['val_bpb']:.3f} ({bpb(pre.get('val_bpb_en'))} / {bpb(pre.get('val_bpb_zh'))})",
                     TARGETS["pretrain"], check(None if pre.get("val_bpb_en") is None else pre["val_bpb_en"] <= 2.10),
                     wall("pretrain")))
    if sft:
        rows.append(("sft", "held-out exact match", f"{pct(sft['accuracy_before'])} -> {pct(sft['accuracy'])}",
                     TARGETS["sft"], check(sft["accuracy"] >= 0.5), wall("sft")))
    if lora:
        old_drop = (lora["old_skills_accuracy_before"] or 0) - (lora["old_skills_accuracy"] or 0)
        rows.append(("lora", "new skill; old skills; trainable",
                     f"{pct(lora['new_skill_accuracy_before'])} -> {pct(lora['new_skill_accuracy'])}; "
                     f"{pct(lora['old_skills_accuracy_before'])} -> {pct(lora['old_skills_accuracy'])}; "
                     f"{pct(lora['trainable_fraction'])}", TARGETS["lora"],
                     check(lora["new_skill_accuracy"] >= 0.6 and old_drop <= 0.10 and lora["trainable_fraction"] < 0.05),
                     wall("lora")))
    if dpo:
        rows.append(("dpo", "preference accuracy; margin; task accuracy",
                     f"{pct(dpo['preference_accuracy'])}; {dpo['reward_margin']:.2f}; "
                     f"{pct(dpo['accuracy_before'])} -> {pct(dpo['accuracy'])}", TARGETS["dpo"],
                     check(dpo["preference_accuracy"] >= 0.8 and dpo["accuracy"] >= dpo["accuracy_before"]),
                     wall("dpo")))
    if sft_cot:
        rows.append(("sft_cot", "held-out exact match (worked answers)",
                     f"{pct(sft_cot['accuracy_before'])} -> {pct(sft_cot['accuracy'])}", TARGETS["sft_cot"],
                     check(sft_cot["accuracy"] >= 0.5), wall("sft_cot")))
    if grpo:
        # above the model it started from, by more than luck: most answers stay, so the few that flipped are what counts
        p = grpo.get("sign_test_p")                                   # absent from metrics of older versions
        flipped = "" if p is None else f" (+{grpo['answers_gained']} / -{grpo['answers_lost']}, p {p:.2g})"
        rows.append(("grpo", "task accuracy; mean reward",
                     f"{pct(grpo['accuracy_before'])} -> {pct(grpo['accuracy'])}{flipped}; "
                     f"{grpo['mean_reward_first']:.2f} -> {grpo['mean_reward_last']:.2f}", TARGETS["grpo"],
                     check(None if p is None else grpo["accuracy"] > grpo["accuracy_before"] and p < NOISE_P),
                     wall("grpo")))
    if choice:
        rows.append(("eval", "multiple choice per byte (chance " + pct(next(iter(choice.values()))["chance"]) + ")",
                     ", ".join(f"{k} {pct(v['accuracy_norm'])}" for k, v in choice.items()), "", "", wall("eval")))
    tables = [rows]

    # accuracy per task family for every checkpoint: where each stage gained or lost
    columns = [("pretrain", sft.get("accuracy_by_family_before")), ("sft", sft.get("accuracy_by_family")),
               ("lora", lora.get("accuracy_by_family")), ("dpo", dpo.get("accuracy_by_family")),
               ("sft_cot", sft_cot.get("accuracy_by_family")), ("grpo", grpo.get("accuracy_by_family"))]
    columns = [(name, dict(fam)) for name, fam in columns if fam]
    families = sorted({f for _, fam in columns for f in fam})
    for name, fam in columns:                              # multiple-choice families, per byte
        for f, a in choice.get(name, {}).get("accuracy_norm_by_family", {}).items():
            fam[f"choice: {f}"] = a
    families += sorted({f"choice: {f}" for r in choice.values() for f in r["accuracy_norm_by_family"]})
    if columns:
        rows = [("task family",) + tuple(name for name, _ in columns)]
        rows += [(f,) + tuple(pct(fam.get(f)) for _, fam in columns) for f in families]
        tables.append(rows)
    return tables


def summary_table(results: dict) -> str:
    """The summary tables in markdown, and the wall time of the stages run now."""
    seconds = results.get("seconds", {})
    lines = [markdown_table(rows) for rows in summary_rows(results)]
    lines.append(f"pipeline wall time: {sum(seconds.values()) / 60:.1f} min for the stages run now "
                 f"({', '.join(seconds) or 'none'})")
    return "\n\n".join(lines)


def markdown_table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"   # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])


def refuse_foreign_weights(name: str, overwrite: bool, logs: Path):
    """Weights in a stage's folder with neither metrics.json nor resume.pt were not left by a
    pipeline run of that stage (it marks the stages it starts) unless that run was cut off before
    its first evaluation: they may be imported or trained by hand, so they are never replaced unasked."""
    folder = ROOT / STAGES[name][1]
    weights = [f for f in (WEIGHTS_FILE, ADAPTER_FILE) if (folder / f).exists()]
    if overwrite or not weights or (folder / RESUME_FILE).exists() or (logs / f"{name}.started").exists():
        return
    path = REASONING_STAGES if name in REASONING_STAGES else DEFAULT_STAGES     # the stages that build on it
    later = [s for s in path if s in STAGES and list(STAGES).index(s) > list(STAGES).index(name)] + ["eval"]
    raise ValueError(f"{STAGES[name][1]}/{weights[0]} was not trained by the pipeline (no metrics.json): "
                     f"to build on it, run the later stages only (python pipeline.py --stages {' '.join(later)}); "
                     f"to retrain it, move it away or add --overwrite")


def main(argv=None):
    cfg = parse_config(PipelineConfig, __doc__.split("\n\n")[0].strip(), argv)
    unknown = set(cfg.stages) - set(STAGES) - {"eval"}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGES)}, eval")
    logs = ROOT / REPORT_DIR
    logs.mkdir(parents=True, exist_ok=True)

    # what will run: stages not yet finished (or all of them, with --overwrite), then the evaluation
    todo = [name for name in STAGES if name in cfg.stages
            and (cfg.overwrite or not (ROOT / STAGES[name][1] / "metrics.json").exists())]
    todo += ["eval"] * ("eval" in cfg.stages)
    for name in todo:
        if name in STAGES:                 # (not "eval": it writes only reports)
            refuse_foreign_weights(name, cfg.overwrite, logs)
    planned = {name: 0.0 for name in todo}
    if cfg.estimate and todo:
        step = calibration_seconds(cfg.device, cfg.dtype)
        planned = estimate(todo, step)
        print(f"pipeline: {', '.join(todo)}: about {minutes(sum(planned.values()))} on this machine ("
              + ", ".join(f"{name} {minutes(s)}" for name, s in planned.items())
              + f"): a training step took {step:.2f} s here, {REFERENCE['calibration_seconds']:.2f} s on the "
              f"reference machine ({REFERENCE['machine']}), whose stage times are scaled by that")
    progress = Progress(planned) if cfg.estimate and todo else None
    show = progress.write if progress else (lambda text: print(text, flush=True))

    seconds = {}
    for name, (command, out_dir) in STAGES.items():
        if name not in cfg.stages:
            continue
        folder = ROOT / out_dir
        if name not in todo:
            show(f"=== {name}: {out_dir}/metrics.json exists, kept (--overwrite retrains it)")
            continue
        extra = ["--device", cfg.device, "--dtype", cfg.dtype, "--seed", str(cfg.seed)]
        started_mark = logs / f"{name}.started"       # "the pipeline began this stage": removed when it ends
        if not cfg.overwrite and (folder / RESUME_FILE).exists():
            extra.append("--resume")           # cut off midway: go on from its last evaluation
        elif cfg.overwrite or any((folder / f).exists() for f in (WEIGHTS_FILE, ADAPTER_FILE)):
            extra.append("--overwrite")        # retrain (or, with nothing to resume from, start over)
        on_progress = (lambda f, name=name: progress.update(name, f)) if progress else (lambda f: None)
        atomic_write_text(started_mark, " ".join(command + extra) + "\n")
        seconds[name] = run_stage(name, command + extra, logs / f"{name}.log", progress=on_progress, show=show,
                                  bar=BAR_LABELS.get(name, name))
        started_mark.unlink()
        if progress:
            progress.finish(name)

    choice = {}
    if "eval" in cfg.stages:
        started = time.time()
        evaluated = [name for name in EVALUATED if (ROOT / STAGES[name][1]).exists()]
        for i, name in enumerate(evaluated):
            out = logs / f"choice_{name}.json"
            run_stage(f"eval {name}", ["evaluation.py", *EVALUATED[name], "--tasks", "choice", "--device", cfg.device,
                                       "--out", str(out)], logs / f"eval_{name}.log", show=show)
            choice[name] = read_json(out)["choice"]
            if progress:
                progress.update("eval", (i + 1) / len(evaluated))
        seconds["eval"] = time.time() - started
    if progress:
        progress.close()

    results = {name: read_json(ROOT / out_dir / "metrics.json") for name, (_, out_dir) in STAGES.items()}
    results.update(choice=choice, seconds=seconds, estimate=planned)
    table = summary_table(results)
    print("\n" + table)
    atomic_write_text(ROOT / "weight" / "pipeline.md", table + "\n")
    atomic_write_text(ROOT / "weight" / "pipeline.json", json.dumps(results, indent=2, ensure_ascii=False))
    report = write_report(ROOT / "weight" / "report.html", results, summary_rows(results), ROOT / "weight",
                          cfg.device, cfg.dtype, *report_tokenizer())
    print(f"\n-> weight/pipeline.md, weight/pipeline.json, {report.relative_to(ROOT)} (the report card: open it "
          f"in a browser)")


def report_tokenizer():
    """The tokenizer the models were trained with, and the validation text of each language to measure it on."""
    folder = ROOT / STAGES["pretrain"][1]
    if not (folder / "tokenizer.json").exists():
        return None, None
    samples = {language: path.read_text(encoding="utf-8")[:200_000]
               for language, path in (("English", DEFAULT_DIR / "en_val.txt"),
                                      ("Chinese", DEFAULT_DIR / "zh_val.txt")) if path.exists()}
    return load_checkpoint_tokenizer(folder), samples


if __name__ == "__main__":
    main_guard(main)
