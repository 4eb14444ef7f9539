"""
Dense feed-forward vs Mixture of Experts with equal active parameters, on the default corpus.

    python bench/bench_moe.py                   # 3 runs of pretrain.py, 150 s of training each (~10 min)
    python bench/bench_moe.py --seconds 60      # shorter
    python bench/bench_moe.py --quick           # a few seconds each: checks the script works

Each variant is trained by `pretrain.py` itself (same data, seed, batch, optimizer and
time budget), one after the other on this machine; only the feed-forward differs:

    dense     one SwiGLU feed-forward of width 512 per block (the default model)
    moe-8x2   8 experts of width 256, each token uses 2: same active width (512), 4x the ffn params
    moe-4x1s  4 routed experts of width 256, each token uses 1, plus 1 shared expert: also 512 active

Printed: total and active parameters, training tokens/s, and validation bits per byte
at the end; bench/results/moe.png plots val bpb against training seconds and against
tokens (the same budget of seconds buys the slower MoE fewer tokens).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine_info, write_record  # noqa: E402  (bench/machine.py)

VARIANTS = {
    "dense": [],
    "moe-8x2": ["--n_experts", "8", "--top_k", "2"],
    "moe-4x1s": ["--n_experts", "4", "--top_k", "1", "--n_shared_experts", "1"],
}


def train(name: str, flags: list[str], seconds: float, quick: bool) -> dict:
    out_dir = RESULTS / f"moe_{name}"
    command = [sys.executable, "pretrain.py", "--out_dir", str(out_dir), "--overwrite", "--sample_tokens", "0",
               "--time_budget", str(seconds), "--eval_interval", "40" if not quick else "2", *flags]
    if quick:
        command += ["--max_steps", "4", "--n_layer", "1", "--eval_tokens", "2048"]
    print(f"--- {name}: {' '.join(command[1:])}", flush=True)
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{name} failed:\n{run.stderr[-2000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    config = json.loads((out_dir / "config.json").read_text())["model"]
    sys.path.insert(0, str(ROOT))
    from model import GPT, ModelConfig
    model = GPT(ModelConfig.from_dict(config))
    with open(out_dir / "log.csv", newline="") as f:
        curve = [(float(r["seconds"]), int(r["tokens"]), float(r["val_bpb"])) for r in csv.DictReader(f) if r["val_bpb"]]
    router = sum(p.numel() for n, p in model.named_parameters() if n.endswith("router.weight"))
    return {"name": name, "params": model.num_params(), "active_params": model.num_params(active=True),
            "router_params": router,
            "tokens_per_second": metrics["tokens_per_second"], "tokens": metrics["tokens"], "steps": metrics["steps"],
            "val_bpb": metrics["val_bpb"], "val_bpb_en": metrics.get("val_bpb_en"), "curve": curve}


def plot(results: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in results:
        seconds, tokens, bpb = zip(*r["curve"])
        label = f"{r['name']} ({r['params'] / 1e6:.2f}M, {r['active_params'] / 1e6:.2f}M active)"
        by_time.plot(seconds, bpb, "o-", label=label, ms=3)
        by_tokens.plot([t / 1e6 for t in tokens], bpb, "o-", label=label, ms=3)
    by_time.set_xlabel("training seconds")
    by_tokens.set_xlabel("training tokens (millions)")
    by_time.set_ylabel("val bits per byte (first 16k tokens per language)")
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    by_time.legend(fontsize=8)
    fig.suptitle("dense vs Mixture of Experts, equal active parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seconds", type=float, default=150.0, help="training seconds per variant")
    parser.add_argument("--quick", action="store_true", help="tiny runs that only check the script works")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = [train(name, VARIANTS[name], args.seconds, args.quick) for name in args.variants]
    # the claim of the comparison: every variant computes with the same parameters per token,
    # apart from the small router (n_embd x n_experts per layer) that only the MoE models have
    active = {r["name"]: r["active_params"] - r["router_params"] for r in results}
    if len(set(active.values())) != 1:
        sys.exit(f"active parameters (without routers) differ, not a comparison at equal compute per token: {active}")
    print(f"\n| variant | params | active params | tokens/s | tokens in {args.seconds:.0f} s | val bpb | en |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['tokens_per_second']:,.0f} "
              f"| {r['tokens'] / 1e6:.2f}M | {r['val_bpb']:.3f} | {r['val_bpb_en']:.3f} |")
    base = results[0]
    for r in results[1:]:
        print(f"{r['name']} vs {base['name']}: {r['tokens_per_second'] / base['tokens_per_second']:.2f}x the tokens/s, "
              f"val bpb {r['val_bpb'] - base['val_bpb']:+.3f}")
    plot(results, RESULTS / "moe.png")
    if args.quick:
        print(f"-> {RESULTS / 'moe.png'} (quick mode: no record written)")
        return
    out = write_record("moe", dict(machine=machine_info("cpu"), args=vars(args), results=results))
    print(f"-> {RESULTS / 'moe.png'}, {out}")


if __name__ == "__main__":
    main()
