"""
Benchmark generation: the KV cache, Hugging Face `generate`, prefill, batching, memory.

    python bench/bench_inference.py            # default-size model, random weights (~3 min on 2 CPU cores)
    python bench/bench_inference.py --quick    # tiny sizes, seconds: checks the script works (no record)
    python bench/bench_inference.py --ckpt weight/pretrain     # your trained weights instead
    python bench/bench_inference.py --device cuda

Every comparison runs side by side in one process on the same weights, alternating
(A, B, A, B, ...) after a warm-up; each figure is the median of the rounds, with their
min-max. Every timer waits for the GPU (bench/machine.py). Correctness is asserted,
never just printed: a failed check stops the run.

1. Decode tokens/s with the KV cache against recomputing the whole context every step
   (what nanoGPT's sample.py does), greedy, batch 1; both must give the same tokens.
2. The project's `GPT.generate` against `transformers` `LlamaForCausalLM.generate` with
   the same weights copied in (same config; equal parameter counts, logits equal within
   1e-4 and identical tokens asserted), greedy, batch 1.
3. Prefill tokens/s and time to first token for prompts of several lengths.
4. Batched throughput: total new tokens/s at batch 1, 8 and 32.
5. Peak memory of generation at each batch size: measured in a fresh process each
   (peak resident memory above the loaded model; on a GPU, peak allocated memory),
   beside the KV cache's own size.

The model is the default one (llama flavour, vocab 4096, 4 layers x 192, 4 heads) with
random weights and a context of 640 tokens, so that a 512-token answer fits.
Results: a markdown table, saved with the machine, torch version and date to
bench/results/inference-YYYYMMDD-HHMM.json (not in --quick mode).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402

from machine import alternate, machine_info, ratios, show, spread, write_record  # noqa: E402  (bench/machine.py)
from engine import generate as engine_generate  # noqa: E402  (the full sampler; model.generate is the short one)
from model import GPT, ModelConfig  # noqa: E402

LOGIT_TOLERANCE = 1e-4   # float32, same weights: only the order of additions differs


@dataclass
class BenchArgs:
    ckpt: str = ""                 # a checkpoint folder instead of random weights
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 640          # context: prompt + the longest answer must fit
    prompt_len: int = 16           # prompt of the decode benchmarks
    decode_lengths: tuple = (128, 512)
    hf_lengths: tuple = (128, 512)  # new tokens in the transformers comparison
    prefill_lengths: tuple = (128, 512)
    batch_sizes: tuple = (1, 8, 32)
    batch_new_tokens: int = 128
    batch_prompt_len: int = 32
    rounds: int = 5                # timed runs per measurement (median and min-max kept)
    device: str = "cpu"
    threads: int = 0               # torch CPU threads; 0 = torch's default
    seed: int = 1337
    quick: bool = False


QUICK = dict(vocab_size=512, n_layer=2, n_embd=64, block_size=160, decode_lengths=(32, 128), hf_lengths=(32,),
             prefill_lengths=(32, 128), batch_sizes=(1, 4), batch_new_tokens=16, rounds=1)
TUPLES = ("decode_lengths", "hf_lengths", "prefill_lengths", "batch_sizes")


def parse_args(argv=None) -> BenchArgs:
    defaults = BenchArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    for name, value in asdict(defaults).items():
        if name == "quick":
            continue
        if name in TUPLES:
            parser.add_argument(f"--{name}", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, value))}")
        else:
            parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value!r}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (to check the script)")
    flags = vars(parser.parse_args(argv))
    quick = flags.pop("quick")
    chosen = dict(QUICK) if quick else {}
    chosen.update({k: (tuple(v) if k in TUPLES else v) for k, v in flags.items() if v is not None})
    args = BenchArgs(**chosen, quick=quick)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return args


# ----------------------------------------------------------------------------------
# Models


def load_model(args: BenchArgs) -> GPT:
    """The trained checkpoint (--ckpt), or the default-size model with random weights."""
    torch.manual_seed(args.seed)
    if args.ckpt:
        from weight.checkpoint import load_checkpoint
        model, _ = load_checkpoint(args.ckpt)
    else:
        model = GPT(ModelConfig(flavour="llama", vocab_size=args.vocab_size, block_size=args.block_size,
                                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
    return model.to(args.device).eval()


def hf_llama_copy(model: GPT):
    """transformers' LlamaForCausalLM with the same config and these very weights; None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    c = model.config
    if c.flavour != "llama" or c.position != "rope" or c.mlp != "swiglu" or c.bias:
        raise SystemExit("the Hugging Face comparison needs a llama-flavour model")
    hf_logging.set_verbosity_error()
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                         max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         attention_bias=c.qkv_bias, tie_word_embeddings=c.tie_embeddings, hidden_act="silu",
                         attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    names = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn.": "self_attn.", "ffn.": "mlp."}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            for ours, theirs in per_layer.items():
                rest = rest.replace(ours, theirs)
            state[f"model.layers.{i}.{rest}"] = tensor
        else:
            first, rest = name.split(".", 1)
            state[f"{names[first]}.{rest}"] = tensor
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (c.tie_embeddings and m == "lm_head.weight")]:
        raise SystemExit(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(next(model.parameters()).device).eval()


# ----------------------------------------------------------------------------------
# Timing


def race(generators: dict, n: int, args: BenchArgs) -> dict[str, list[float]]:
    """Two ways of generating the same n tokens, timed alternately: tok/s of each in every
    round. They must produce identical tokens, or the race is not fair: asserted."""
    out = {}
    runs = {name: (lambda name=name, generate=generate: out.__setitem__(name, generate()))
            for name, generate in generators.items()}
    seconds = alternate(runs, args.rounds, args.device)
    (a, first), (b, second) = out.items()
    assert torch.equal(first, second), f"{n} new tokens: {a} and {b} generate different tokens"
    return {name: [n / s for s in times] for name, times in seconds.items()}


def random_prompt(args: BenchArgs, batch: int, length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + length)
    return torch.randint(vocab, (batch, length), generator=g).to(args.device)


# ----------------------------------------------------------------------------------
# 1. KV cache vs recompute; 2. against transformers


@torch.no_grad()
def bench_decode(model: GPT, args: BenchArgs) -> list[dict]:
    prompt = random_prompt(args, 1, args.prompt_len, model.config.vocab_size)
    results = []
    for n in args.decode_lengths:
        if args.prompt_len + n > model.config.block_size:
            print(f"decode: {n} new tokens do not fit the context of {model.config.block_size}: skipped")
            continue
        tok_s = race({name: (lambda cache=cache: engine_generate(model, prompt, n, temperature=0, use_cache=cache))
                      for name, cache in (("KV cache", True), ("recompute", False))}, n, args)
        row = dict(new_tokens=n, cache_tok_s=spread(tok_s["KV cache"]), recompute_tok_s=spread(tok_s["recompute"]),
                   speedup=ratios(tok_s["KV cache"], tok_s["recompute"]), identical=True)
        print(f"decode, {n} new tokens: KV cache {show(row['cache_tok_s'])} tok/s, recompute "
              f"{show(row['recompute_tok_s'])} tok/s: {show(row['speedup'], '.2f', 'x')}; tokens identical")
        results.append(row)
    return results


@torch.no_grad()
def bench_against_hf(model: GPT, args: BenchArgs) -> list[dict]:
    hf = hf_llama_copy(model)
    if hf is None:
        print("transformers: skipped, not installed (pip install transformers safetensors)")
        return []
    n_ours, n_theirs = model.num_params(), sum(p.numel() for p in hf.parameters())
    assert n_ours == n_theirs, f"parameters differ: project {n_ours:,}, LlamaForCausalLM {n_theirs:,}"
    prompt = random_prompt(args, 1, args.prompt_len, model.config.vocab_size)
    max_logit_diff = (model(prompt)[0] - hf(prompt).logits).abs().max().item()
    assert max_logit_diff <= LOGIT_TOLERANCE, f"logits differ from LlamaForCausalLM by {max_logit_diff:.2e}"
    results = []
    for n in args.hf_lengths:
        if args.prompt_len + n > model.config.block_size:
            continue
        tok_s = race({"project": lambda: model.generate(prompt, n, temperature=0),
                      "transformers": lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False,
                                                          pad_token_id=0,      # no eos: exactly n tokens
                                                          attention_mask=torch.ones_like(prompt))}, n, args)
        row = dict(new_tokens=n, project_tok_s=spread(tok_s["project"]), hf_tok_s=spread(tok_s["transformers"]),
                   speedup=ratios(tok_s["project"], tok_s["transformers"]), identical=True, params=n_ours,
                   max_logit_diff=max_logit_diff)
        print(f"vs transformers LlamaForCausalLM.generate, {n} new tokens: project {show(row['project_tok_s'])} "
              f"tok/s, transformers {show(row['hf_tok_s'])} tok/s: {show(row['speedup'], '.2f', 'x')}; same "
              f"{n_ours:,} parameters, logits within {max_logit_diff:.1e}, tokens identical")
        results.append(row)
    return results


# ----------------------------------------------------------------------------------
# 3. Prefill and time to first token; 4. batches


@torch.no_grad()
def bench_prefill(model: GPT, args: BenchArgs) -> list[dict]:
    results = []
    for length in args.prefill_lengths:
        if length >= model.config.block_size:
            continue
        prompt = random_prompt(args, 1, length, model.config.vocab_size)

        def prefill():          # the prompt through the model, filling a KV cache
            model(prompt, kv_cache=model.new_kv_cache(1, length + 1), last_only=True)

        def first_token():      # what a user waits for: prefill + picking the first token
            engine_generate(model, prompt, 1, temperature=0)
        seconds = alternate({"prefill": prefill, "first": first_token}, args.rounds, args.device)
        row = dict(prompt_tokens=length, prefill_tok_s=spread([length / s for s in seconds["prefill"]], 0),
                   time_to_first_token_ms=spread([s * 1000 for s in seconds["first"]], 2))
        print(f"prefill, {length}-token prompt: {show(row['prefill_tok_s'], ',.0f')} tok/s, "
              f"time to first token {show(row['time_to_first_token_ms'], '.1f', ' ms')}")
        results.append(row)
    return results


@torch.no_grad()
def bench_batches(model: GPT, args: BenchArgs) -> list[dict]:
    """Total new tokens/s at each batch size, the sizes alternated round by round."""
    n = args.batch_new_tokens
    prompts = {b: random_prompt(args, b, args.batch_prompt_len, model.config.vocab_size) for b in args.batch_sizes}
    seconds = alternate({b: (lambda p=p: model.generate(p, n, temperature=0)) for b, p in prompts.items()},
                        args.rounds, args.device)
    tok_s = {b: [b * n / s for s in times] for b, times in seconds.items()}
    first, results = args.batch_sizes[0], []
    for batch, rates in tok_s.items():
        row = dict(batch=batch, new_tokens=n, total_tok_s=spread(rates), vs_batch_1=ratios(rates, tok_s[first]))
        print(f"batch {batch}: {show(row['total_tok_s'], ',.0f')} new tokens/s in total "
              f"({show(row['vs_batch_1'], '.2f', 'x')} batch {first})")
        results.append(row)
    return results


# ----------------------------------------------------------------------------------
# 5. Memory, each measurement in a fresh process (a process's peak memory never goes down)


def kv_cache_bytes(config: ModelConfig, batch: int, positions: int, bytes_per_value: int = 4) -> int:
    """Keys and values of every layer: 2 x n_layer x batch x n_kv_head x positions x head_dim values."""
    return 2 * config.n_layer * batch * config.n_kv_head * positions * config.head_dim * bytes_per_value


def rss_mib() -> float:
    """Resident memory of this process now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """The highest resident memory this process ever had (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_peak_above_now(fn) -> float:
    """MiB of memory fn needs at its peak above what the process holds now: sampled every
    half millisecond, and exact where the peak is the highest of the process's life."""
    before, highest_before, peak = rss_mib(), peak_rss_mib(), [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    if peak_rss_mib() > highest_before:
        peak[0] = max(peak[0], peak_rss_mib())
    return max(peak[0] - before, 0.0), before


def memory_probe(args: BenchArgs, batch: int, results):
    """In a fresh process: load the model, generate once, report peak memory above the loaded model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    prompt = random_prompt(args, batch, args.batch_prompt_len, model.config.vocab_size)
    with torch.no_grad():
        model.generate(prompt, 2, temperature=0)          # warm-up: the allocator's and kernels' own memory
        generate = lambda: model.generate(prompt, args.batch_new_tokens, temperature=0)  # noqa: E731
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            generate()
            results.put((batch, (torch.cuda.max_memory_allocated() - base) / 2**20, base / 2**20))
        else:
            results.put((batch, *cpu_peak_above_now(generate)))


def bench_memory(model: GPT, args: BenchArgs) -> list[dict]:
    if not hasattr(resource, "getrusage") or sys.platform != "linux":
        print("memory: skipped (needs Linux)")
        return []
    spawn = multiprocessing.get_context("spawn")
    results = []
    for batch in args.batch_sizes:
        queue = spawn.Queue()
        probe = spawn.Process(target=memory_probe, args=(args, batch, queue))
        probe.start()
        _, extra, loaded = queue.get(timeout=600)
        probe.join()
        cache = kv_cache_bytes(model.config, batch, args.batch_prompt_len + args.batch_new_tokens) / 2**20
        row = dict(batch=batch, peak_extra_mib=round(extra, 1), kv_cache_mib=round(cache, 2),
                   loaded_process_mib=round(loaded, 1))
        print(f"memory, batch {batch}: generation peaks {row['peak_extra_mib']:.1f} MiB above the loaded model "
              f"(process {row['loaded_process_mib']:.0f} MiB); its KV cache is {row['kv_cache_mib']:.2f} MiB")
        results.append(row)
    return results


# ----------------------------------------------------------------------------------
# Report


def markdown(report: dict, args: BenchArgs) -> str:
    """Medians, then (min-max) over the rounds; A / B is the median of the rounds' ratios."""
    rows = ["| benchmark | A | B | A | B | A / B |", "|---|---|---|---:|---:|---:|"]
    for d in report["decode"]:
        rows.append(f"| decode {d['new_tokens']} tokens, greedy, batch 1 (tok/s) | KV cache | recompute "
                    f"| {show(d['cache_tok_s'])} | {show(d['recompute_tok_s'])} | {show(d['speedup'], '.2f', 'x')} |")
    for h in report["transformers"]:
        rows.append(f"| decode {h['new_tokens']} tokens, greedy, batch 1 (tok/s) | project `generate` "
                    f"| HF `LlamaForCausalLM.generate` | {show(h['project_tok_s'])} | {show(h['hf_tok_s'])} "
                    f"| {show(h['speedup'], '.2f', 'x')} |")
    b = report["batches"]
    for row in b[1:]:
        rows.append(f"| {row['new_tokens']} new tokens, total tok/s | batch {row['batch']} | batch {b[0]['batch']} "
                    f"| {show(row['total_tok_s'], ',.0f')} | {show(b[0]['total_tok_s'], ',.0f')} "
                    f"| {show(row['vs_batch_1'], '.2f', 'x')} |")
    lines = ["\n".join(rows), "", "| prompt tokens | prefill tok/s | time to first token |", "|---:|---:|---:|"]
    lines += [f"| {p['prompt_tokens']} | {show(p['prefill_tok_s'], ',.0f')} "
              f"| {show(p['time_to_first_token_ms'], '.1f', ' ms')} |" for p in report["prefill"]]
    if report["memory"]:
        lines += ["", f"| batch | peak memory of generating {args.batch_new_tokens} tokens (above the loaded model) "
                      f"| of which KV cache |", "|---:|---:|---:|"]
        lines += [f"| {m['batch']} | {m['peak_extra_mib']:.1f} MiB | {m['kv_cache_mib']:.2f} MiB |"
                  for m in report["memory"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    model = load_model(args)
    print(f"machine: torch {machine['torch']}, transformers {machine['transformers']}, {args.device} "
          f"({machine.get('gpu', machine['cpu'])}), {machine['threads']} threads"
          f"{' (quick mode)' if args.quick else ''}\nmodel: {model.summary()}"
          f"{' from ' + args.ckpt if args.ckpt else ', random weights'}")
    report = dict(machine=machine, args=asdict(args), model=model.config.to_dict())
    report["decode"] = bench_decode(model, args)
    report["transformers"] = bench_against_hf(model, args)
    report["prefill"] = bench_prefill(model, args)
    report["batches"] = bench_batches(model, args)
    report["memory"] = bench_memory(model, args)
    report["table"] = markdown(report, args)
    print("\n" + report["table"])
    if args.quick:
        print("\nquick mode: no record written")
        return
    print(f"\nsaved {write_record('inference', report).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
