"""
Pretraining against the baseline a learner would otherwise run: nanoGPT's CPU recipe.

    python bench/bench_baseline.py            # both, one after the other, at equal wall time

nanoGPT's README suggests, for a CPU, its character-level Shakespeare config shrunk to
4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0 (AdamW lr 1e-3, beta2 0.99,
warmup 100, cosine to 1e-4). Here that recipe is rebuilt on the project's own model.py
(flavour gpt2: learned positions, LayerNorm, GELU, biases, tied embeddings, as nanoGPT's
model) over bytes, which for the English corpus are its characters. Both models learn the
English half of the default corpus only and are scored on the same held-out English text
in bits per byte.

First `python pretrain.py --zh_share 0` runs with its defaults (a fixed number of steps);
then the baseline trains for the same wall time (its learning-rate schedule follows the
clock, so it finishes its decay), and both figures go to bench/results/baseline-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import machine_info  # noqa: E402  (bench/machine.py)
from model import GPT, ModelConfig  # noqa: E402

NANOGPT_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4,
                   warmup=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0)


def byte_tokens(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64))


@torch.no_grad()
def bits_per_byte(model: GPT, data: torch.Tensor, block_size: int, batch_size: int = 64) -> float:
    """Every byte of data predicted once, in consecutive windows: mean loss in bits."""
    model.eval()
    n_windows = (len(data) - 1) // block_size
    nats, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        x = torch.stack([data[r * block_size:(r + 1) * block_size] for r in rows])
        y = torch.stack([data[r * block_size + 1:(r + 1) * block_size + 1] for r in rows])
        _, loss = model(x, targets=y, reduction="none")
        nats += loss.sum().item()
        count += y.numel()
    model.train()
    return nats / count / math.log(2)


def train_baseline(seconds: float, seed: int) -> dict:
    """nanoGPT's CPU recipe for `seconds` of training steps; the cosine decay ends when the time does."""
    torch.manual_seed(seed)
    c = NANOGPT_CPU
    train, val = byte_tokens(ROOT / "data/default/en_train.txt"), byte_tokens(ROOT / "data/default/en_val.txt")
    model = GPT(ModelConfig(vocab_size=256, block_size=c["block_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                            n_embd=c["n_embd"], flavour="gpt2", dropout=0.0))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, c["beta2"]))
    spent, step = 0.0, 0
    while spent < seconds:
        progress = min(1.0, spent / seconds)
        lr = c["lr"] * (step + 1) / c["warmup"] if step < c["warmup"] else \
            c["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (c["lr"] - c["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        starts = torch.randint(len(train) - c["block_size"] - 1, (c["batch_size"],))
        x = torch.stack([train[s:s + c["block_size"]] for s in starts])
        y = torch.stack([train[s + 1:s + 1 + c["block_size"]] for s in starts])
        _, loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spent += time.perf_counter() - started
        step += 1
    return {"steps": step, "seconds": round(spent, 1), "params": model.num_params(),
            "val_bpb_en": round(bits_per_byte(model, val, c["block_size"]), 4), "recipe": c}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="baseline-")) / "pretrain_en"
    started = time.time()
    subprocess.run([sys.executable, "pretrain.py", "--zh_share", "0", "--seed", str(args.seed), "--out_dir", str(out),
                    "--sample_tokens", "0"], cwd=ROOT, check=True)
    ours = json.loads((out / "metrics.json").read_text())
    print(f"project: {ours['steps']} steps, {ours['seconds']:.0f} s of steps ({time.time() - started:.0f} s in all), "
          f"English bpb {ours['val_bpb_en']:.3f}")
    baseline = train_baseline(ours["seconds"], args.seed)
    print(f"nanoGPT CPU recipe: {baseline['steps']} steps in {baseline['seconds']:.0f} s, English bpb "
          f"{baseline['val_bpb_en']:.3f}")
    lead = 1 - ours["val_bpb_en"] / baseline["val_bpb_en"]
    print(f"the project's bpb is {lead:.1%} lower at equal training time")
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info("cpu"),
              "project": {k: ours[k] for k in ("steps", "seconds", "val_bpb_en", "params", "tokens_per_second")},
              "nanogpt_cpu": baseline, "lead": round(lead, 4)}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"baseline-{time.strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
