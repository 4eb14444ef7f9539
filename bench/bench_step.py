"""
Where a training step's time goes on this machine: the numbers behind the choice of recipe.

    python bench/bench_step.py            # the default model, about a minute on 2 CPU cores
    python bench/bench_step.py --quick    # tiny sizes, seconds: checks the script works (no record)

1. A pretraining step of the default model (16 x 256 tokens, Muon for the hidden matrices,
   AdamW for the rest, as pretrain.py): forward, backward and optimizer timed apart.
2. The operators of forward + backward (torch.profiler), grouped: matrix products,
   attention, the output's log-softmax, element-wise and the rest, as shares of the time.
3. An SFT-shaped step (32 conversations of 48 tokens, the last third of each scored as the
   answer) with Muon and with AdamW, alternately,
   from the same weights (their first losses are asserted equal): what Muon's
   Newton-Schulz iteration costs per step, a cost that does not shrink with the batch.
4. The same pretraining step on one thread and on every thread torch uses: how well the
   step spreads over the cores.

Rounds alternate, A, B, A, B, ... after a warm-up; each figure is the median with the
min-max of the rounds (bench/README.md). Record: bench/results/step-YYYYMMDD-HHMM.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402

from machine import alternate, machine_info, ratios, show, spread, write_record  # noqa: E402  (bench/machine.py)
from model import GPT, IGNORE_INDEX, ModelConfig  # noqa: E402
from optim import make_optimizer  # noqa: E402
from training import TrainConfig  # noqa: E402

# profiler operator names -> the group they are counted in (the first matching substring wins)
GROUPS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
          ("attention", ("scaled_dot_product", "flash_attention")),
          ("log-softmax (loss)", ("log_softmax", "nll_loss", "cross_entropy")),
          ("element-wise", ("aten::mul", "aten::add", "aten::silu", "aten::neg", "aten::cat", "aten::pow",
                            "aten::rsqrt", "aten::mean", "aten::div", "aten::sub", "aten::sum", "aten::fill_",
                            "aten::copy_", "aten::where", "aten::embedding")))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds: checks the script (no record)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1 timed round is needed for a median")
    return args


def batch(config: ModelConfig, rows: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(config.vocab_size, (rows, length), generator=g),
            torch.randint(config.vocab_size, (rows, length), generator=g))


def train_step(model, optimizer, x, y):
    """One whole training step on a fixed batch, as a no-argument function (for machine.alternate)."""
    def step():
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_parts(model, optimizer, x, y, rounds: int) -> dict:
    """Seconds of forward, backward and optimizer step, each the median over rounds (after a warm-up)."""
    parts = defaultdict(list)
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if r:                                       # round 0 is the warm-up
            for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                parts[name].append(seconds)
    return {name: spread(values, 3) for name, values in parts.items()}


def operator_shares(model, x, y) -> dict:
    """Share of forward + backward CPU time per operator group (self time, so nothing counts twice)."""
    from torch.profiler import ProfilerActivity, profile
    _, loss = model(x, y)
    loss.backward()                                  # warm-up outside the profile
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, loss = model(x, y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    totals = defaultdict(float)
    for event in prof.key_averages():
        group = next((g for g, names in GROUPS if any(n in event.key for n in names)), "other")
        totals[group] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {group: round(totals[group] / whole, 3) for group in [g for g, _ in GROUPS] + ["other"]}


def main():
    args = parse_args()
    config = ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, block_size=64) if args.quick \
        else ModelConfig()
    rounds = 2 if args.quick else args.rounds
    pre_rows, pre_len = (4, 64) if args.quick else (16, config.block_size)
    sft_rows, sft_len = (8, 24) if args.quick else (32, 48)
    torch.manual_seed(1337)
    model = GPT(config)
    threads = torch.get_num_threads()
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {threads} threads")

    # 1. a pretraining step, part by part
    x, y = batch(config, pre_rows, pre_len, 0)
    muon = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    parts = step_parts(model, muon, x, y, rounds)
    total = sum(p["median"] for p in parts.values())
    pre_tokens = pre_rows * pre_len
    print(f"\npretraining step ({pre_rows} x {pre_len} tokens, Muon): " + ", ".join(
        f"{name} {show(s, '.3f', ' s')}" for name, s in parts.items()) + f"; {pre_tokens / total:,.0f} tokens/s")

    # 2. the operators of forward + backward
    shares = operator_shares(model, x, y)
    print("forward + backward by operator: " + ", ".join(f"{g} {s:.0%}" for g, s in shares.items()))

    # 3. an SFT-shaped step with Muon and with AdamW, from the same weights
    sx, sy = batch(config, sft_rows, sft_len, 1)
    sy[:, :sft_len * 2 // 3] = IGNORE_INDEX          # the prompt: as in SFT, only the answers are scored
    models = {name: copy.deepcopy(model) for name in ("muon", "adamw")}
    first = {name: m(sx, sy)[1].item() for name, m in models.items()}
    assert first["muon"] == first["adamw"], f"the two copies differ before any step: {first}"
    optimizers = {name: make_optimizer(m, TrainConfig(optimizer=name), torch.device("cpu"))
                  for name, m in models.items()}
    sft = alternate({name: train_step(models[name], optimizers[name], sx, sy) for name in models}, rounds, "cpu")
    for name, m in models.items():
        after = m(sx, sy)[1].item()
        assert after < first[name], f"{name}: {rounds + 1} steps on one batch did not lower its loss " \
                                    f"({first[name]:.3f} -> {after:.3f})"
    sft_ratio = ratios(sft["muon"], sft["adamw"])
    print(f"\nSFT-shaped step ({sft_rows} x {sft_len} tokens): Muon {show(spread(sft['muon'], 3), '.3f', ' s')}, "
          f"AdamW {show(spread(sft['adamw'], 3), '.3f', ' s')}; Muon / AdamW {show(sft_ratio, '.2f', 'x')}")

    # 4. one thread against all of them, the same pretraining step
    pre_step = train_step(model, muon, x, y)

    def on_threads(n):
        def step():
            torch.set_num_threads(n)
            try:
                pre_step()
            finally:
                torch.set_num_threads(threads)
        return step
    by_threads = alternate({"1 thread": on_threads(1), f"{threads} threads": on_threads(threads)}, rounds, "cpu")
    scaling = ratios(by_threads["1 thread"], by_threads[f"{threads} threads"])
    print(f"pretraining step on 1 thread / on {threads}: {show(scaling, '.2f', 'x')} "
          f"(a perfect spread over {threads} threads would be {threads}x)")

    record = {"machine": machine_info("cpu"), "args": vars(args), "model": {"n_layer": config.n_layer,
              "n_embd": config.n_embd, "vocab_size": config.vocab_size, "block_size": config.block_size},
              "pretraining_step": {"rows": pre_rows, "length": pre_len, "parts": parts,
                                   "tokens_per_second": round(pre_tokens / total)},
              "operator_shares": shares,
              "sft_step": {"rows": sft_rows, "length": sft_len, "muon": spread(sft["muon"], 3),
                           "adamw": spread(sft["adamw"], 3), "muon_over_adamw": sft_ratio},
              "threads": {"threads": threads, "one_over_all": scaling}}
    if args.quick:
        print("\n--quick: no record written")
    else:
        print(f"\nrecord: {write_record('step', record)}")


if __name__ == "__main__":
    main()
