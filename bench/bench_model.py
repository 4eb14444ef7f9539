"""
Benchmark the model: training throughput against Hugging Face GPT-2, and the KV cache.

    python bench/bench_model.py            # full run (about 4 minutes on 2 CPU cores)
    python bench/bench_model.py --quick    # tiny sizes, a few seconds: checks the script works (no record)
    python bench/bench_model.py --device cuda --dtype bfloat16 --n_layer 12 --n_embd 768 --n_head 12

1. Training: tokens/s of one forward + backward + AdamW step of the project's
   `GPT` (flavour "gpt2") and of `transformers.GPT2LMHeadModel` built from a
   `GPT2Config` of the same size and the same activation (the tanh GELU as one fused
   kernel, `gelu_pytorch_tanh`; GPT-2's default `gelu_new` is the same function as a
   Python formula: `--hf_activation gelu_new`), with the project model's random weights
   copied in. Equal parameter counts and equal logits are asserted before any timing.
   Both get the same batch, the same loss (cross-entropy on all positions, in float32),
   the same optimizer and dropout 0. They run alternately (A, B, A, B, ...) after a
   warm-up, so a slower or busier moment of the machine hits both; the median of the
   rounds is reported with their min-max.
   `transformers` is a benchmark-only dependency (`pip install transformers
   safetensors`); without it this part is skipped.
2. Generation: tokens/s of the project's `GPT.generate` with the KV cache against
   recomputing the whole context every step, greedy, batch 1; in float32 both must
   produce the same tokens (asserted; under bf16 autocast the two paths round
   differently, so there the first difference is only reported).
3. Precision: training tokens/s of the project's default (llama-flavour) model in
   float32 against bf16 autocast, alternately, the same batch: what `--dtype auto`
   gains on this machine (on a CPU, bf16 is only fast with AVX512-BF16 or AMX).

All figures come from one run on one machine, so their ratios are fair. Every timer
waits for the GPU (bench/machine.py). They are printed as a markdown table and saved,
with the machine, torch version and date, to bench/results/model-YYYYMMDD-HHMM.json.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from machine import alternate, machine_info, ratios, show, spread, write_record  # noqa: E402  (bench/machine.py)
from engine import generate as engine_generate  # noqa: E402  (the full sampler; model.generate is the short one)
from model import GPT, ModelConfig  # noqa: E402

LEARNING_RATE = 3e-4
LOGIT_TOLERANCE = 1e-4   # float32, same weights: only the order of additions differs


@dataclass
class BenchArgs:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 256        # training context (n_positions for GPT-2)
    batch_size: int = 8
    warmup: int = 2              # untimed training steps per model
    rounds: int = 5              # timed rounds, each model once per round
    steps: int = 3               # training steps per model per round
    gen_block_size: int = 1024   # context of the generation model (>= prompt + longest generation)
    prompt_len: int = 32
    gen_lengths: tuple = (256, 512)
    gen_rounds: int = 3          # timed generations per length and mode (median kept)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0             # torch CPU threads; 0 = torch's default
    hf_activation: str = "gelu_pytorch_tanh"  # model.py's F.gelu(approximate="tanh"); GPT-2's default is gelu_new
    seed: int = 1337
    quick: bool = False


QUICK = dict(vocab_size=512, n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=4,
             warmup=1, rounds=2, steps=2, gen_block_size=160, prompt_len=16, gen_lengths=(64, 128), gen_rounds=1)


def parse_args() -> BenchArgs:
    defaults = BenchArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    for name, value in asdict(defaults).items():
        if name in ("quick", "gen_lengths"):
            continue
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value}")
    parser.add_argument("--gen_lengths", type=int, nargs="+", default=None,
                        help=f"new tokens per generation, default {' '.join(map(str, defaults.gen_lengths))}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (to check the script)")
    flags = vars(parser.parse_args())
    quick = flags.pop("quick")
    chosen = dict(QUICK) if quick else {}
    chosen.update({k: v for k, v in flags.items() if v is not None})  # explicit flags win over --quick
    chosen["gen_lengths"] = tuple(chosen.get("gen_lengths", defaults.gen_lengths))
    args = BenchArgs(**chosen, quick=quick)
    if args.prompt_len + max(args.gen_lengths) > args.gen_block_size:
        sys.exit(f"--gen_block_size {args.gen_block_size} is too small for a {args.prompt_len}-token prompt "
                 f"plus {max(args.gen_lengths)} new tokens: raise it")
    if args.dtype not in ("float32", "bfloat16"):
        sys.exit(f"--dtype {args.dtype}: use float32 or bfloat16 (bfloat16 runs under autocast)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return args


# ----------------------------------------------------------------------------------
# Timing helpers


def autocast(args: BenchArgs):
    """bfloat16 autocast (weights stay float32), or nothing for float32."""
    if args.dtype == "bfloat16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------
# 1. Training throughput: project GPT vs transformers GPT2LMHeadModel


def project_gpt(args: BenchArgs, block_size: int) -> GPT:
    config = ModelConfig(flavour="gpt2", vocab_size=args.vocab_size, block_size=block_size,
                         n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    return GPT(config).to(args.device)


def hf_gpt2(ours: GPT, args: BenchArgs):
    """GPT2LMHeadModel of the same config holding a copy of our weights; None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    from weight.hf import export_state_dict      # our names -> GPT-2's (fused c_attn, Conv1D transposed)
    hf_logging.set_verbosity_error()
    c = ours.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                        n_embd=c.n_embd, n_inner=c.ffn_hidden, layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
                        activation_function=args.hf_activation, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in export_state_dict(ours).items()}, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith((".attn.bias", ".attn.masked_bias"))]
    assert not missing and not unexpected, f"weight copy into GPT2LMHeadModel failed: missing {missing}, " \
                                           f"unexpected {unexpected}"
    hf.tie_weights()
    return hf.to(args.device)


@torch.no_grad()
def check_same_model(ours: GPT, theirs, args: BenchArgs) -> float:
    """Assert equal parameter counts and equal logits (float32) on a random batch: the same network."""
    n_ours, n_theirs = count_params(ours), count_params(theirs)
    assert n_ours == n_theirs, f"parameters differ: project GPT {n_ours:,}, GPT2LMHeadModel {n_theirs:,}"
    x = torch.randint(args.vocab_size, (2, args.block_size), device=args.device)
    ours.eval(), theirs.eval()
    diff = (ours(x)[0] - theirs(input_ids=x, use_cache=False).logits).abs().max().item()
    assert diff <= LOGIT_TOLERANCE, (f"logits differ by {diff:.2e} (> {LOGIT_TOLERANCE:g}): the two models "
                                     f"do not compute the same function (activation {args.hf_activation}?)")
    return diff


def count_params(model: torch.nn.Module) -> int:
    """Parameters counted once (parameters() skips the second use of a tied matrix)."""
    return sum(p.numel() for p in model.parameters())


def project_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    """The same loss as model.py: cross-entropy over every position, logits in float32."""
    logits = model(input_ids=x, use_cache=False).logits                       # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def make_train_step(model, loss_fn, x, y, args: BenchArgs):
    """One forward + backward + AdamW update on a fixed batch, as a no-argument function."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)

    def step():
        with autocast(args):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(args: BenchArgs) -> dict | None:
    torch.manual_seed(args.seed)
    ours = project_gpt(args, args.block_size)
    theirs = hf_gpt2(ours, args)
    if theirs is None:
        print("training: skipped, transformers is not installed (pip install transformers safetensors)")
        return None
    diff = check_same_model(ours, theirs, args)
    print(f"training: {ours.summary()}")
    print(f"training: GPT2LMHeadModel ({args.hf_activation}) with the same {count_params(ours):,} parameters "
          f"and weights; logits equal within {diff:.1e}")

    data = torch.randint(args.vocab_size, (args.batch_size, args.block_size + 1), device=args.device)
    x, y = data[:, :-1], data[:, 1:]                                          # (B, T) each
    rates = train_rates({"project": make_train_step(ours, project_loss, x, y, args),
                         "hf": make_train_step(theirs, hf_loss, x, y, args)}, args)
    row = dict(params=count_params(ours), max_logit_diff=diff, hf_activation=args.hf_activation,
               tokens_per_step=args.batch_size * args.block_size, project_tok_s=spread(rates["project"], 0),
               hf_tok_s=spread(rates["hf"], 0), ratio=ratios(rates["project"], rates["hf"]))
    print(f"training: project GPT {show(row['project_tok_s'], ',.0f')} tok/s, GPT2LMHeadModel "
          f"{show(row['hf_tok_s'], ',.0f')} tok/s: {show(row['ratio'], '.2f', 'x')} (median (min-max) of "
          f"{args.rounds} rounds)")
    return row


def train_rates(steps: dict, args: BenchArgs) -> dict[str, list[float]]:
    """Tokens/s of each named training step in every round: `warmup` untimed steps each, then
    rounds of `steps` steps, A, B, A, B, ..."""
    tokens = args.batch_size * args.block_size * args.steps
    runs = {name: (lambda step=step: [step() for _ in range(args.steps)]) for name, step in steps.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    seconds = alternate(runs, args.rounds, args.device, warmup=0)
    return {name: [tokens / s for s in times] for name, times in seconds.items()}


# ----------------------------------------------------------------------------------
# 2. Generation: KV cache vs recomputing the context


def generate(model, prompt, n: int, use_cache: bool, args: BenchArgs) -> torch.Tensor:
    with autocast(args):
        return engine_generate(model, prompt, n, temperature=0.0, use_cache=use_cache)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first differing token (rows of batch 1), or -1 if identical."""
    differs = (a != b).flatten().nonzero()
    return int(differs[0]) if len(differs) else -1


def bench_generation(args: BenchArgs) -> list[dict]:
    torch.manual_seed(args.seed)
    model = project_gpt(args, args.gen_block_size).eval()
    prompt = torch.randint(args.vocab_size, (1, args.prompt_len), device=args.device)   # (1, T)
    # Warm-up. A GPU picks (and may compile) kernels for each new sequence length on first
    # use, so there the warm-up runs every length the timed runs will see; a CPU needs only a few.
    warmup_tokens = max(args.gen_lengths) if args.device == "cuda" else 8
    for use_cache in (True, False):
        generate(model, prompt, warmup_tokens, use_cache, args)

    results = []
    for n in args.gen_lengths:
        outputs = {}
        runs = {cache: (lambda cache=cache: outputs.__setitem__(cache, generate(model, prompt, n, cache, args)))
                for cache in (True, False)}
        seconds = alternate(runs, args.gen_rounds, args.device, warmup=0)
        cached, recompute = ([n / s for s in seconds[c]] for c in (True, False))
        diff = first_difference(outputs[True], outputs[False])
        if args.dtype == "float32":
            assert diff == -1, (f"{n} new tokens: the KV cache and recomputing give different tokens from new "
                                f"token {diff - args.prompt_len}: the cache is wrong")
        row = dict(new_tokens=n, prompt_tokens=args.prompt_len, cache_tok_s=spread(cached),
                   recompute_tok_s=spread(recompute), speedup=ratios(cached, recompute), identical=diff == -1)
        print(f"generation: {n} new tokens after a {args.prompt_len}-token prompt: KV cache "
              f"{show(row['cache_tok_s'])} tok/s, recompute {show(row['recompute_tok_s'])} tok/s, "
              f"{show(row['speedup'], '.2f', 'x')}; tokens "
              f"{'identical' if diff == -1 else f'differ from new token {diff - args.prompt_len}'}")
        if diff != -1:
            print("  (bf16: the two paths round differently, and a near-tie between the top two logits of a "
                  "random-init model can flip a greedy pick)")
        results.append(row)
    return results


# ----------------------------------------------------------------------------------
# 3. Precision: float32 vs bf16 autocast, training the llama flavour


def bench_precision(args: BenchArgs) -> dict:
    from runtime import cpu_has_native_bf16
    torch.manual_seed(args.seed)
    config = ModelConfig(flavour="llama", vocab_size=args.vocab_size, block_size=args.block_size,
                         n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    data = torch.randint(args.vocab_size, (args.batch_size, args.block_size + 1), device=args.device)
    x, y = data[:, :-1], data[:, 1:]                                          # (B, T) each
    steps = {dtype: make_train_step(GPT(config).to(args.device), project_loss, x, y,
                                    BenchArgs(**{**asdict(args), "dtype": dtype}))
             for dtype in ("float32", "bfloat16")}
    rates = train_rates(steps, args)
    native = args.device != "cpu" or cpu_has_native_bf16()
    row = dict(fp32_tok_s=spread(rates["float32"], 0), bf16_tok_s=spread(rates["bfloat16"], 0),
               ratio=ratios(rates["bfloat16"], rates["float32"]), native_bf16=native)
    print(f"precision: llama flavour, float32 {show(row['fp32_tok_s'], ',.0f')} tok/s, bf16 autocast "
          f"{show(row['bf16_tok_s'], ',.0f')} tok/s: {show(row['ratio'], '.2f', 'x')} "
          f"({'native' if native else 'emulated'} bf16)")
    return row


# ----------------------------------------------------------------------------------
# Report


def markdown_table(train: dict | None, generation: list[dict], args: BenchArgs, precision: dict) -> str:
    """Medians, then (min-max) over the rounds; A / B is the median of the rounds' ratios."""
    rows = ["| benchmark | A | B | A tok/s | B tok/s | A / B |",
            "|---|---|---|---:|---:|---:|"]
    if train is not None:
        rows.append(f"| training, {args.batch_size}x{args.block_size} tokens/step, fwd+bwd+AdamW "
                    f"| project GPT | HF GPT2LMHeadModel ({args.hf_activation}) "
                    f"| {show(train['project_tok_s'], ',.0f')} "
                    f"| {show(train['hf_tok_s'], ',.0f')} | {show(train['ratio'], '.2f', 'x')} |")
    for g in generation:
        rows.append(f"| generation, {g['new_tokens']} new tokens, greedy, batch 1 "
                    f"| KV cache | recompute | {show(g['cache_tok_s'])} | {show(g['recompute_tok_s'])} "
                    f"| {show(g['speedup'], '.2f', 'x')} |")
    rows.append(f"| training, llama flavour, {args.batch_size}x{args.block_size} tokens/step "
                f"| bf16 autocast | float32 | {show(precision['bf16_tok_s'], ',.0f')} "
                f"| {show(precision['fp32_tok_s'], ',.0f')} | {show(precision['ratio'], '.2f', 'x')} |")
    return "\n".join(rows)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device, dtype=args.dtype)
    print(f"machine: torch {machine['torch']}, transformers {machine['transformers']}, "
          f"{machine['device']} ({machine.get('gpu', machine['cpu'])}), {machine['threads']} threads, "
          f"{machine['dtype']}{' (quick mode)' if args.quick else ''}")

    train = bench_training(args)
    generation = bench_generation(args)
    precision = bench_precision(args)

    table = markdown_table(train, generation, args, precision)
    print("\n" + table)
    print(f"\nmachine: torch {machine['torch']}, {machine['threads']} threads of {machine['cpu_cores']} "
          f"cores, {machine['device']}, {machine['dtype']}; size: vocab {args.vocab_size}, "
          f"{args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads")
    if args.quick:
        print("quick mode: no record written")
        return
    out = write_record("model", dict(machine=machine, args=asdict(args), training=train, generation=generation,
                                     precision=precision, table=table))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
