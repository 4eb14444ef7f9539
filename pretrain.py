"""
pretrain.py -- teach a Transformer to predict the next token of plain text.

    python pretrain.py                          # default bilingual corpus, CPU, a few minutes
    python pretrain.py --data my.txt more.jsonl # your own text (.txt, or .jsonl with {"text": ...})
    python pretrain.py --preset gpt2-124m       # GPT-2 small size, for a GPU
    torchrun --nproc_per_node 2 pretrain.py     # data-parallel on 2 processes (gloo on CPU, nccl on GPU)
    python pretrain.py --resume                 # continue a run that was stopped
    python pretrain.py --n_experts 8 --top_k 2  # Mixture-of-Experts feed-forward
    python pretrain.py --n_encoder_layer 2 --n_layer 2 --out_dir weight/pretrain_s2s   # encoder-decoder
    python pretrain.py --chat_share 0.25        # mid-training: a quarter of each batch is chat conversations

Steps: build the corpus and tokenizer if missing -> tokenize once into .bin files ->
train on random windows: the loss is the cross-entropy of every next token ->
evaluate bits per byte on held-out text -> weight/pretrain/.

Mid-training (--chat_share, off by default): part of each batch comes from SFT's training
conversations, read like any text, so the model meets the chat template's tokens and the
tasks' words before SFT. SFT starts further on, but did not need fewer steps for it
(measured in docs/choices.md).

Bits per byte (bpb) = total cross-entropy in bits / number of UTF-8 bytes predicted.
Unlike loss per token, it does not depend on the tokenizer, so any two runs compare.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import DEFAULT_CHAT_DIR, build_default_chat_data, chat_token_stream
from data.pretrain_data import MixedBatches, TokenBin, objective_batches, prepare_pretraining_data
from flags import arg, explicit_flags, main_guard, parse_config
from model import ModelConfig, build_model
from runtime import finish, setup_runtime
from tokenizer import DEFAULT_TOKENIZER_PATH
from training import TrainConfig, check_train_config, resumed_flags, run_training, write_metrics
from weight.checkpoint import ROOT, check_tokenizer_matches, load_checkpoint


@dataclass
class PretrainConfig(TrainConfig):
    # data and tokenizer (the model's flags are model.ModelConfig's: --n_layer, --n_embd, ...)
    data: tuple = arg((), "text files to train on (.txt, or .jsonl with {\"text\": ...}); "
                          "empty = the default Shakespeare + Chinese poetry corpus", nargs="*", type=str)
    tokenizer: str = arg(str(DEFAULT_TOKENIZER_PATH.relative_to(ROOT)),
                         "tokenizer file; trained on the training text if it does not exist")
    vocab_size: int = arg(4096, "vocabulary size when a new tokenizer is trained (the model takes the tokenizer's)")
    zh_share: float = arg(0.2, "default corpus: share of the text in each batch taken from Chinese "
                                "(its natural share is about a third; less leaves more for English)")
    chat_share: float = arg(0.0, "default corpus: share of each batch taken from SFT's training conversations "
                                 "(mid-training: SFT then starts from a model that knows the chat format; "
                                 "measured in docs/choices.md)")
    cache_dir: str = arg("data/cache", "where tokenized user data (--data) is cached")
    objective: str = arg("auto", "next_token: predict every next token (decoder-only); next_span: the encoder reads "
                                 "the first half of a window, the decoder writes the second half (encoder-decoder); "
                                 "auto: the one that fits the model", choices=["auto", "next_token", "next_span"])
    sample_tokens: int = arg(60, "tokens of sample text printed at the end (0 = none)")
    # the shared training flags, with this stage's defaults (a fixed amount of work: 400 steps of 4,096 tokens)
    out_dir: str = "weight/pretrain"
    max_steps: int = 400
    optimizer: str = "muon"
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    eval_interval: int = 100
    eval_tokens: int = 16384


PRESETS = {
    # the default: a small model that trains on a laptop CPU in a few minutes
    "cpu": {},
    # GPT-2 small (124M with GPT-2's 50k vocabulary); for a GPU, with your own data (--data)
    "gpt2-124m": dict(flavour="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0,
                      batch_size=16, grad_accum=8, lr=6e-4, min_lr=6e-5, warmup_steps=200,
                      max_steps=5000, eval_interval=250, eval_tokens=262144, compile=True,
                      optimizer="adamw", time_budget=0),
    # the same size in the modern flavour, with grouped-query attention
    "llama-124m": dict(flavour="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024,
                       batch_size=16, grad_accum=8, lr=6e-4, min_lr=6e-5, warmup_steps=200,
                       max_steps=5000, eval_interval=250, eval_tokens=262144, compile=True,
                       optimizer="adamw", time_budget=0),
}


def bits_per_byte_evaluator(val_bins: dict[str, TokenBin], token_bytes: torch.Tensor, block_size: int,
                            batch_size: int, device: torch.device, to_batch=lambda x, y: (x, y),
                            untrained: tuple[str, ...] = ()):
    """evaluate(model, max_tokens) -> val_loss (nats/token) and bpb, overall and per split.

    untrained: splits of a language the run does not train on (--zh_share 0): reported, but left
    out of the overall figures, which pick the best checkpoint (they would pick an early one).

    to_batch turns each validation window into the model's inputs, its targets last
    (for next_span: only the second half of each window is predicted and counted).

    bpb = sum over predicted tokens of -log2 p(token) / sum of their UTF-8 bytes.
    Special tokens (<|endoftext|>) count 0 bytes, and their loss still counts, so bpb
    stays an honest upper bound on the cost of the text.
    """
    def evaluate(model, max_tokens: int | None) -> dict:
        totals = {"nats": 0.0, "tokens": 0, "bytes": 0}
        metrics = {}
        for name, data in val_bins.items():
            nats = n_tokens = n_bytes = 0
            for x, y in data.eval_batches(batch_size, block_size, max_tokens or None):
                *inputs, targets = [t.to(device) for t in to_batch(x, y)]
                _, loss = model(*inputs, targets=targets, reduction="none")   # (b, T) nats per position
                nats += loss.float().sum().item()
                n_tokens += targets.numel()
                n_bytes += token_bytes[targets].sum().item()
            suffix = name.removeprefix("val")                     # "", "_en", "_zh"
            metrics[f"val_loss{suffix}"] = nats / n_tokens
            metrics[f"val_bpb{suffix}"] = nats / math.log(2) / max(n_bytes, 1)
            if name in untrained:
                continue
            totals["nats"] += nats
            totals["tokens"] += n_tokens
            totals["bytes"] += n_bytes
        metrics["val_loss"] = totals["nats"] / totals["tokens"]
        metrics["val_bpb"] = totals["nats"] / math.log(2) / max(totals["bytes"], 1)
        return metrics
    return evaluate


def main(argv=None):
    started = time.time()
    cfg, model_flags = parse_config(PretrainConfig, __doc__.split("\n\n")[0].strip(), argv, presets=PRESETS,
                                    model_flags=True)
    cfg, model_flags = resumed_flags(cfg, argv, model_flags)     # --resume: the flags of the run it continues
    check_train_config(cfg)        # bad flags fail now, not after minutes of data preparation
    for name in ("zh_share", "chat_share"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name} {getattr(cfg, name)}: must be in [0, 1)")
    if cfg.chat_share and cfg.data:
        raise ValueError("--chat_share mixes the generated chat tasks into the default corpus; with --data, "
                         "put your own conversations (rendered as text) among your files instead")
    if not cfg.init_from:
        objective_batches(cfg.objective, ModelConfig(**model_flags))
    rt = setup_runtime(cfg)

    # 1. data: the main process builds what is missing, the others then find it cached
    tokenizer, train_bins, val_bins = rt.main_first(
        lambda: prepare_pretraining_data(cfg.data, cfg.tokenizer, cfg.vocab_size, cfg.cache_dir, verbose=rt.is_main))
    if len(train_bins) == 1:
        train_data = next(iter(train_bins.values()))
    else:  # the default corpus: English and Chinese (and, with --chat_share, conversations) in every batch
        text = 1 - cfg.chat_share
        shares = {"train_en": text * (1 - cfg.zh_share), "train_zh": text * cfg.zh_share}
        if cfg.chat_share:   # mid-training: SFT's training conversations, read like any text (the loss on every token)
            chat_file = rt.main_first(lambda: build_default_chat_data(DEFAULT_CHAT_DIR, verbose=rt.is_main))["train"]
            train_bins["train_chat"] = TokenBin(chat_file, None, chat_token_stream(chat_file, tokenizer))
            shares["train_chat"] = cfg.chat_share
        train_data = MixedBatches(train_bins, shares)

    # 2. model: fresh, or continued from a checkpoint (whose config.json decides the architecture)
    if cfg.init_from:
        model, ckpt_config = load_checkpoint(cfg.init_from)
        check_tokenizer_matches(ckpt_config, tokenizer, cfg.init_from)
        for name in sorted(explicit_flags(argv if argv is not None else sys.argv[1:]) & set(model_flags)):
            if model_flags[name] != getattr(model.config, name):
                print(f"note: --{name} {model_flags[name]} is ignored: {cfg.init_from} has "
                      f"{name}={getattr(model.config, name)} and its config.json decides the architecture")
    else:
        model = build_model(ModelConfig(**model_flags, vocab_size=tokenizer.vocab_size,
                                        decoder_start_id=tokenizer.eot_id if model_flags["n_encoder_layer"] else 0))
    to_batch = objective_batches(cfg.objective, model.config)   # next_token, or next_span for an encoder-decoder
    block_size = model.config.block_size
    if rt.is_main:
        print(model.summary())
        print("data: " + ", ".join(f"{n} {len(b):,}" for n, b in train_bins.items()) + " training tokens, "
              + ", ".join(f"{n} {len(b):,}" for n, b in val_bins.items())
              + f"; {cfg.batch_size * cfg.grad_accum * rt.world_size * block_size:,} tokens per step"
              + f" on {rt.device} ({str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es))")

    # 3. train: random windows of the text (x, y = x shifted by one token), the loss on every next token
    def next_batch(generator):
        return to_batch(*train_data.random_batch(cfg.batch_size, block_size, generator))

    def next_token_loss(model, batch):
        *inputs, targets = batch                 # (x,) or an encoder-decoder's (source, decoder input); (B, T)
        return model(*inputs, targets=targets)[1]

    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.long, device=rt.device)
    untrained = ("val_zh",) if len(val_bins) > 1 and cfg.zh_share == 0 else ()
    evaluate = bits_per_byte_evaluator(val_bins, token_bytes, block_size, cfg.batch_size * 2, rt.device, to_batch,
                                       untrained)
    meta = {"tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
            "data": [str(p) for p in cfg.data] or "default"}
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="pretrain",
                          compute_loss=next_token_loss)

    # 4. final numbers: the saved (best) weights on all of the validation text
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir)
        best.to(rt.device).eval()
        with torch.no_grad(), rt.autocast():
            final = evaluate(best, None)
        metrics = {"val_bpb_en": None, "val_bpb_zh": None, **final,   # the per-language keys, even without Chinese
                   "params": best.num_params(), "tokens": result["tokens"],
                   "tokens_per_second": round(result["tokens_per_second"], 1),
                   "seconds": round(result["seconds"], 1), "wall_seconds": round(time.time() - started, 1),
                   "steps": result["step"], "device": str(rt.device), "world_size": rt.world_size}
        write_metrics(Path(cfg.out_dir), metrics)
        langs = ", ".join(f"{lang} {metrics[f'val_bpb_{lang}']:.3f}" for lang in ("en", "zh")
                          if metrics[f"val_bpb_{lang}"] is not None)
        print(f"pretrain: val bpb {metrics['val_bpb']:.3f}" + (f" ({langs})" if langs else "")
              + f", val loss {metrics['val_loss']:.3f}, "
              f"{metrics['params'] / 1e6:.2f}M params, {metrics['tokens']:,} tokens in {metrics['seconds']:.0f}s "
              f"({metrics['tokens_per_second']:,.0f} tok/s) -> {cfg.out_dir}/")
        if cfg.sample_tokens:
            prompt = torch.tensor([tokenizer.encode_ordinary("\n")], device=rt.device)
            out = best.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50,
                                generator=torch.Generator(device=rt.device).manual_seed(cfg.seed))
            new = out if model.config.n_encoder_layer else out[:, prompt.shape[1]:]   # a decoder-only model repeats the prompt
            print("sample:\n" + tokenizer.decode(new[0].tolist()).strip())
    finish(rt)


if __name__ == "__main__":
    main_guard(main, processes=True)      # --nproc N: N processes (DDP), as torchrun
