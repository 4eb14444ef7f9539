"""
Encoder-decoder (Seq2Seq) vs decoder-only of similar size on the same dialogue task.

    python bench/bench_seq2seq.py                  # 2 x (pretrain 200 steps + SFT 600 steps) (~14 min on 2 cores)
    python bench/bench_seq2seq.py --pretrain_steps 100 --sft_steps 300    # shorter (both learn little more than the persona)
    python bench/bench_seq2seq.py --quick          # seconds: checks the script works

Both models are made by the project's own commands, with the same data, seed, optimizer
and number of steps (the same tokens: 3-4 minutes of training each on 2 idle cores); only
the architecture differs. Steps, not seconds: the accuracies are then the same on any machine,
busy or idle; only the times and tokens/s depend on it:

    decoder   4 decoder blocks (the default model): pretrain.py (next token), full_sft.py
    seq2seq   2 encoder + 2 decoder blocks: pretrain.py --n_encoder_layer 2 --n_layer 2
              (next span: the encoder reads half a window, the decoder writes the rest), full_sft.py
              (the encoder reads the conversation, the decoder writes the answer)

Measured: parameters; training time and peak memory (the whole process, as the OS
reports it); held-out exact match of the chat tasks (from full_sft.py's metrics.json);
inference peak memory and generation tokens/s (greedy, batch 1, KV cache, the held-out
prompts), each in a fresh process so one model's memory does not count for the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine_info, write_record  # noqa: E402  (bench/machine.py)

ARCHS = {"decoder": [], "seq2seq": ["--n_encoder_layer", "2", "--n_layer", "2"]}


def run(command: list[str]) -> tuple[float, float, str]:
    """Run `python command...` in the repository; returns (seconds, peak resident memory in MB, output)."""
    started = time.time()
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"failed: python {' '.join(command)}\n{output.decode(errors='replace')[-3000:]}")
    # ru_maxrss: the most resident memory the process ever held, in kB on Linux
    return time.time() - started, usage.ru_maxrss / 1024, output.decode(errors="replace")


def measure_inference(ckpt: str, n_prompts: int, max_new_tokens: int):
    """In this (fresh) process: load ckpt, answer held-out prompts greedily; print tokens/s as JSON."""
    sys.path.insert(0, str(ROOT))
    import torch

    from data.chat_data import DEFAULT_CHAT_DIR, read_conversations
    from tokenizer.chat import render_chat
    from engine import generate
    from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer
    model, _ = load_checkpoint(ckpt)
    tokenizer = load_checkpoint_tokenizer(ckpt)
    model.eval()
    records = list(read_conversations(DEFAULT_CHAT_DIR / "sft_eval.jsonl"))[::8][:n_prompts]
    tokens, seconds = 0, 0.0
    with torch.no_grad():
        for record in records:
            ids = render_chat(record["conversations"][:-1], tokenizer, add_generation_prompt=True)[0]
            started = time.perf_counter()
            new = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0.0,
                           stop_tokens=(tokenizer.im_end_id,))[0]
            new = new if model.config.n_encoder_layer else new[len(ids):]
            stops = (new == tokenizer.im_end_id).nonzero()
            tokens += int(stops[0]) + 1 if len(stops) else len(new)     # up to and with the first stop token
            seconds += time.perf_counter() - started
    print(json.dumps({"tokens": tokens, "tokens_per_second": tokens / seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--pretrain_steps", type=int, default=200, help="pretraining steps per model")
    parser.add_argument("--sft_steps", type=int, default=600, help="SFT steps per model")
    parser.add_argument("--quick", action="store_true", help="tiny runs that only check the script works")
    parser.add_argument("--infer", default="", help=argparse.SUPPRESS)        # internal: measure one checkpoint
    args = parser.parse_args()
    if args.infer:
        return measure_inference(args.infer, 4 if args.quick else 50, 32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    quick = ["--max_steps", "3", "--eval_interval", "3"] if args.quick else []
    rows = []
    for arch, flags in ARCHS.items():
        pre, sft = RESULTS / f"s2s_{arch}_pretrain", RESULTS / f"s2s_{arch}_sft"
        print(f"--- {arch}: pretraining {args.pretrain_steps} steps, then SFT {args.sft_steps} steps", flush=True)
        pre_seconds, pre_memory, _ = run(["pretrain.py", "--out_dir", str(pre), "--overwrite", "--sample_tokens", "0",
                                          "--max_steps", str(args.pretrain_steps), "--eval_interval",
                                          str(args.pretrain_steps), *flags, *quick])
        sft_seconds, sft_memory, _ = run(["full_sft.py", "--init_from", str(pre), "--out_dir", str(sft), "--overwrite",
                                          "--max_steps", str(args.sft_steps), "--eval_interval", str(args.sft_steps),
                                          *quick])
        _, infer_memory, output = run([__file__, "--infer", str(sft)] + ["--quick"] * args.quick)
        speed = json.loads(output.strip().splitlines()[-1])
        pre_metrics = json.loads((pre / "metrics.json").read_text())
        sft_metrics = json.loads((sft / "metrics.json").read_text())
        rows.append({"arch": arch, "params": pre_metrics["params"], "val_bpb": pre_metrics["val_bpb"],
                     "pretrain_seconds": pre_seconds, "sft_seconds": sft_seconds,
                     "train_memory_mb": max(pre_memory, sft_memory), "accuracy": sft_metrics["accuracy"],
                     "accuracy_by_family": sft_metrics["accuracy_by_family"], "infer_memory_mb": infer_memory,
                     "tokens_per_second": speed["tokens_per_second"]})
    print("\n| model | params | pretrain + SFT wall | training peak memory | held-out exact match "
          "| inference peak memory | generation tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['params'] / 1e6:.2f}M | {r['pretrain_seconds']:.0f} s + {r['sft_seconds']:.0f} s "
              f"| {r['train_memory_mb']:.0f} MB | {100 * r['accuracy']:.1f}% | {r['infer_memory_mb']:.0f} MB "
              f"| {r['tokens_per_second']:.0f} |")
    # the claim of the comparison: models of similar size (within 25% of parameters)
    sizes = [r["params"] for r in rows]
    if max(sizes) > 1.25 * min(sizes):
        sys.exit(f"the models differ in size by more than 25%, not a like-for-like comparison: {sizes}")
    families = sorted(rows[0]["accuracy_by_family"])
    print("\n| family | " + " | ".join(r["arch"] for r in rows) + " |\n|---|" + "---:|" * len(rows))
    for f in families:
        print(f"| {f} | " + " | ".join(f"{100 * r['accuracy_by_family'].get(f, 0):.0f}%" for r in rows) + " |")
    if args.quick:
        print("quick mode: no record written")
        return
    out = write_record("seq2seq", dict(machine=machine_info("cpu"), args=vars(args), results=rows))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
