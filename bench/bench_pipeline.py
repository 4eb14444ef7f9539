"""
Benchmark the whole default pipeline from a fresh clone: every target against its bar, the
steps, tokens per second and wall time of each stage, in one JSON record per run.

    python bench/bench_pipeline.py                       # float32, seed 1337, every core
    python bench/bench_pipeline.py --seed 1 --cores 1    # another seed, on one core (like taskset -c 0)
    python bench/bench_pipeline.py --summary             # the spread over every record in bench/results/

Each run clones the repository's HEAD into a temporary folder (its own corpus, tokenizer,
data and checkpoints, as a new user gets them), runs `python pipeline.py --dtype float32
--seed S` there, and writes bench/results/pipeline-<date>-seed<S>-<cores>core.json with the
machine it ran on. Every stage does a fixed amount of work, so two runs with one seed give
the same numbers on any machine; different seeds show the run-to-run spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import machine_info  # noqa: E402  (bench/machine.py)

RESULTS = ROOT / "bench" / "results"
# target name -> (how to read the value from weight/pipeline.json, the bar, higher is better)
TARGETS = {
    "pretrain English bpb": (lambda r: r["pretrain"]["val_bpb_en"], 2.10, False),
    "SFT held-out exact match": (lambda r: r["sft"]["accuracy"], 0.50, True),
    "LoRA new skill": (lambda r: r["lora"]["new_skill_accuracy"], 0.60, True),
    "LoRA old skills drop (points)": (lambda r: 100 * (r["lora"]["old_skills_accuracy_before"]
                                                       - r["lora"]["old_skills_accuracy"]), 10.0, False),
    "DPO preference accuracy": (lambda r: r["dpo"]["preference_accuracy"], 0.80, True),
    "DPO task accuracy minus SFT's (points)": (lambda r: 100 * (r["dpo"]["accuracy"] - r["dpo"]["accuracy_before"]),
                                               0.0, True),
}


def run(seed: int, cores: int, dtype: str, keep: bool) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder / "repo")], check=True)
    repo = folder / "repo"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    preexec = None
    if cores:
        env.update(OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores))
        chosen = sorted(os.sched_getaffinity(0))[:cores]
        preexec = lambda: os.sched_setaffinity(0, chosen)   # noqa: E731  (what `taskset -c 0` does)
    print(f"bench_pipeline: seed {seed}, {cores or os.cpu_count()} core(s), {dtype}, commit {head}, in {repo}")
    started = time.time()
    with open(folder / "pipeline.log", "wb") as log:
        done = subprocess.run([sys.executable, "pipeline.py", "--dtype", dtype, "--seed", str(seed)], cwd=repo,
                              env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed (exit {done.returncode}): see {folder / 'pipeline.log'}")
    results = json.loads((repo / "weight" / "pipeline.json").read_text())
    record = {"seed": seed, "dtype": dtype, "cores": cores or os.cpu_count(), "commit": head,
              "date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": round(wall, 1),
              "machine": machine_info("cpu"), "estimate_seconds": results.get("estimate", {}),
              "stages": {name: {"seconds": round(results["seconds"].get(name, 0.0), 1),
                                "steps": results.get(name, {}).get("steps"),
                                "tokens_per_second": results.get(name, {}).get("tokens_per_second")}
                         for name in ("pretrain", "sft", "lora", "dpo", "eval")},
              "targets": {}}
    for name, (read, bar, higher) in TARGETS.items():
        value = read(results)
        record["targets"][name] = {"value": round(value, 4), "bar": bar,
                                   "met": value >= bar if higher else value <= bar}
    record["accuracy_by_family"] = {stage: results[stage].get("accuracy_by_family")
                                    for stage in ("sft", "lora", "dpo")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pipeline-{time.strftime('%Y%m%d-%H%M')}-seed{seed}-{record['cores']}core.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print_record(record)
    print(f"-> {out}")
    if not keep:
        subprocess.run(["rm", "-rf", str(folder)])
    return record


def print_record(record: dict):
    print(f"seed {record['seed']}, {record['cores']} core(s), {record['dtype']}: pipeline {record['wall_seconds'] / 60:.1f} min")
    for name, stage in record["stages"].items():
        tok_s = f", {stage['tokens_per_second']:,.0f} tok/s" if stage.get("tokens_per_second") else ""
        print(f"  {name:8s} {stage['seconds']:6.0f} s, {stage.get('steps') or '-'} steps{tok_s}")
    for name, t in record["targets"].items():
        print(f"  {name:40s} {t['value']:8.3f}  bar {t['bar']:6.2f}  {'met' if t['met'] else 'MISSED'}")


def summary():
    """Every record's targets side by side, with the spread over the runs of each core count."""
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("pipeline-*.json"))]
    if not records:
        raise SystemExit(f"no records in {RESULTS}: run python bench/bench_pipeline.py first")
    for cores in sorted({r["cores"] for r in records}):
        runs = [r for r in records if r["cores"] == cores]
        print(f"{len(runs)} run(s) on {cores} core(s): seeds {[r['seed'] for r in runs]}, "
              f"wall {min(r['wall_seconds'] for r in runs) / 60:.1f}-{max(r['wall_seconds'] for r in runs) / 60:.1f} min")
        for name in TARGETS:
            values = [r["targets"][name]["value"] for r in runs]
            met = sum(r["targets"][name]["met"] for r in runs)
            spread = f"{statistics.mean(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"
            print(f"  {name:40s} {spread}  met in {met}/{len(runs)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seed", type=int, default=1337, help="passed to every stage")
    parser.add_argument("--cores", type=int, default=0, help="run on this many cores only (0 = all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its log and checkpoints)")
    parser.add_argument("--summary", action="store_true", help="only summarise the records in bench/results/")
    args = parser.parse_args()
    if args.summary:
        return summary()
    run(args.seed, args.cores, args.dtype, args.keep)


if __name__ == "__main__":
    main()
