"""
pretrain.py -- teach a Transformer to predict the next token of plain text.

    python pretrain.py                          # default bilingual corpus, CPU, a few minutes
    python pretrain.py --data my.txt more.jsonl # your own text (.txt, or .jsonl with {"text": ...})
    python pretrain.py --preset gpt2-124m       # GPT-2 small size, for a GPU
    torchrun --nproc_per_node 2 pretrain.py     # data-parallel on 2 processes (gloo on CPU, nccl on GPU)
    python pretrain.py --resume                 # continue a run that was stopped
    python pretrain.py --n_experts 8 --top_k 2  # Mixture-of-Experts feed-forward
    python pretrain.py --n_encoder_layer 2 --n_layer 2 --out_dir weight/pretrain_s2s   # encoder-decoder

Steps: build the corpus and tokenizer if missing -> tokenize once into .bin files ->
train on random windows -> evaluate bits per byte on held-out text -> weight/pretrain/.

Bits per byte (bpb) = total cross-entropy in bits / number of UTF-8 bytes predicted.
Unlike loss per token, it does not depend on the tokenizer, so any two runs compare.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from data.corpus import build_default_corpus
from data.pretrain_data import MixedBatches, TokenBin, check_data_file, prepare_dataset, read_documents, token_dtype
from model import ModelConfig, build_model
from tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, train_tokenizer_on_files
from training import (ROOT, TrainConfig, arg, check_tokenizer_matches, check_train_config, load_checkpoint,
                      main_guard, parse_config, run_training, setup_runtime, write_metrics)

DEFAULT_CORPUS_DIR = ROOT / "data" / "default"


@dataclass
class PretrainConfig(TrainConfig):
    # data and tokenizer
    data: tuple = arg((), "text files to train on (.txt, or .jsonl with {\"text\": ...}); "
                          "empty = the default Shakespeare + Chinese poetry corpus", nargs="*", type=str)
    tokenizer: str = arg(str(DEFAULT_TOKENIZER_PATH.relative_to(ROOT)),
                         "tokenizer file; trained on the training text if it does not exist")
    vocab_size: int = arg(4096, "vocabulary size when a new tokenizer is trained")
    zh_share: float = arg(0.2, "default corpus: share of each batch taken from the Chinese text "
                                "(its natural share is about a third; less leaves more for English)")
    cache_dir: str = arg("data/cache", "where tokenized user data (--data) is cached")
    # model (see model.ModelConfig)
    flavour: str = arg("llama", "gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)",
                       choices=["gpt2", "llama"])
    n_layer: int = arg(4, "Transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_kv_head: int = arg(0, "key/value heads for grouped-query attention (0 = n_head)")
    n_embd: int = arg(192, "embedding width")
    block_size: int = arg(256, "context length in tokens")
    dropout: float = arg(0.0, "dropout probability")
    # Mixture of Experts (see model.MoEFeedForward); 0 experts = the dense feed-forward
    n_experts: int = arg(0, "routed experts per block (0 = a dense feed-forward)")
    top_k: int = arg(2, "experts each token is sent to")
    n_shared_experts: int = arg(0, "experts every token always uses")
    expert_hidden: int = arg(0, "width of one expert (0 = ffn width / (top_k + shared): equal active parameters)")
    aux_loss_coef: float = arg(0.01, "weight of the load-balancing loss")
    capacity_factor: float = arg(0.0, "an expert takes at most this x its fair share of tokens (0 = no limit)")
    # encoder-decoder (see model.Seq2Seq)
    n_encoder_layer: int = arg(0, "> 0: an encoder-decoder model with this many encoder blocks (and n_layer "
                                  "decoder blocks); 0 = decoder-only")
    objective: str = arg("auto", "next_token: predict every next token (decoder-only); next_span: the encoder reads "
                                 "the first half of a window, the decoder writes the second half (encoder-decoder); "
                                 "auto: the one that fits the model", choices=["auto", "next_token", "next_span"])
    # training (defaults chosen for a 2-core CPU and a ~5 minute run)
    out_dir: str = arg("weight/pretrain", "output folder")
    max_steps: int = arg(600, "optimizer steps (at most: the time budget usually ends the run first)")
    time_budget: float = arg(210.0, "seconds of training steps; the schedule follows the clock "
                                    "(0 = off: exactly max_steps, reproducible)")
    optimizer: str = arg("muon", "muon (Muon for the blocks' matrices, AdamW for the rest) or adamw",
                         choices=["adamw", "muon"])
    batch_size: int = arg(16, "sequences per micro-batch")
    lr: float = arg(3e-3, "peak learning rate")
    min_lr: float = arg(3e-4, "final learning rate")
    warmup_steps: int = arg(30, "linear warmup steps")
    eval_interval: int = arg(130, "evaluate and checkpoint every N steps")
    eval_tokens: int = arg(16384, "tokens per validation split in periodic evals")
    sample_tokens: int = arg(60, "tokens of sample text printed at the end (0 = none)")


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


def model_config(cfg: PretrainConfig, vocab_size: int, start_id: int = 0) -> ModelConfig:
    """The model the flags describe (ModelConfig checks it: one clear line if impossible)."""
    return ModelConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                       n_encoder_layer=cfg.n_encoder_layer, decoder_start_id=start_id if cfg.n_encoder_layer else 0,
                       n_head=cfg.n_head, n_kv_head=cfg.n_kv_head or None, n_embd=cfg.n_embd,
                       flavour=cfg.flavour, dropout=cfg.dropout, n_experts=cfg.n_experts, top_k=cfg.top_k,
                       n_shared_experts=cfg.n_shared_experts, expert_hidden=cfg.expert_hidden or None,
                       aux_loss_coef=cfg.aux_loss_coef, capacity_factor=cfg.capacity_factor)


def check_objective(objective: str, config: ModelConfig) -> str:
    """The objective to train with: next_token for a decoder-only model, next_span for an encoder-decoder one."""
    fits = "next_span" if config.n_encoder_layer else "next_token"
    if objective not in ("auto", fits):
        kind = "an encoder-decoder" if config.n_encoder_layer else "a decoder-only"
        raise ValueError(f"--objective {objective} does not fit {kind} model: use --objective {fits} "
                         f"(or --n_encoder_layer {'0' if config.n_encoder_layer else 'N'} for the other kind)")
    return fits


def as_next_span(x: torch.Tensor, y: torch.Tensor, start_id: int):
    """Windows (x, y = x shifted by one), (B, T) each -> (source, decoder input, targets) for next_span:
    the encoder reads the first half of each window, the decoder writes the second half."""
    window = torch.cat([x[:, :1], y], dim=1)                      # (B, T+1) the whole window
    half = window.shape[1] // 2
    source, targets = window[:, :half], window[:, half:]          # (B, h), (B, T+1-h)
    decoder_input = torch.cat([torch.full_like(targets[:, :1], start_id), targets[:, :-1]], dim=1)
    return source, decoder_input, targets


def note_checkpoint_config_wins(cfg: PretrainConfig, loaded: ModelConfig, argv=None):
    """--init_from rebuilds the model its checkpoint describes; say so for any model flag that disagrees."""
    given = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    for name in sorted(given & {f.name for f in fields(ModelConfig)}):
        if getattr(cfg, name) != getattr(loaded, name):
            print(f"note: --{name} {getattr(cfg, name)} is ignored: {cfg.init_from} has {name}={getattr(loaded, name)} "
                  f"and its config.json decides the architecture")


def prepare_data(cfg: PretrainConfig, verbose: bool):
    """Corpus -> tokenizer -> token .bin files.

    Returns (tokenizer, folder of .bin files, training split names, validation split names).
    """
    if cfg.data:
        splits, cache_root, user_files = {"train": [Path(p) for p in cfg.data]}, None, True
        for path in splits["train"]:
            check_data_file(path)          # before a tokenizer is trained on them
    else:
        splits, cache_root, user_files = build_default_corpus(DEFAULT_CORPUS_DIR, verbose), DEFAULT_CORPUS_DIR, False
    tok_path = Path(cfg.tokenizer)
    if not tok_path.is_absolute():
        tok_path = ROOT / tok_path
    if not tok_path.exists():
        if verbose:
            print(f"tokenizer: {tok_path} missing, training a {cfg.vocab_size}-token BPE on the training text")
        train_files = [p for name, paths in splits.items() if name.startswith("train") for p in paths]
        if user_files:   # only the training part of each file: validation text stays unseen
            texts = (doc for path in train_files for doc in read_documents(path, "train"))
            tokenizer = Tokenizer.from_texts(texts, cfg.vocab_size)
            tokenizer.save(tok_path)
        else:
            tokenizer = train_tokenizer_on_files(train_files, cfg.vocab_size, tok_path)
    else:
        tokenizer = Tokenizer.load(tok_path)
    if user_files:  # one cache folder per set of user files
        import hashlib
        key = hashlib.sha256("\n".join(sorted(str(Path(p).resolve()) for p in cfg.data)).encode()).hexdigest()[:12]
        cache_root = ROOT / cfg.cache_dir / key
    bin_dir = prepare_dataset(splits, tokenizer, cache_root / "tokens", user_files=user_files)
    if user_files:
        return tokenizer, bin_dir, ["train"], ["val"]
    return tokenizer, bin_dir, [s for s in splits if s.startswith("train")], [s for s in splits if s.startswith("val")]


def bits_per_byte_evaluator(val_bins: dict[str, TokenBin], token_bytes: torch.Tensor, block_size: int,
                            batch_size: int, device: torch.device, to_batch=lambda x, y: (x, y)):
    """evaluate(model, max_tokens) -> val_loss (nats/token) and bpb, overall and per split.

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
            for x, y in data.eval_batches(batch_size, block_size, max_tokens):
                batch = [t.to(device) for t in to_batch(x, y)]
                y = batch[-1]                                     # the targets
                _, loss = model(*batch, reduction="none")        # (b, T) nats per position
                nats += loss.float().sum().item()
                n_tokens += y.numel()
                n_bytes += token_bytes[y].sum().item()
            suffix = name[len("val"):]                            # "", "_en", "_zh"
            metrics[f"val_loss{suffix}"] = nats / n_tokens
            metrics[f"val_bpb{suffix}"] = nats / math.log(2) / max(n_bytes, 1)
            totals["nats"] += nats
            totals["tokens"] += n_tokens
            totals["bytes"] += n_bytes
        metrics["val_loss"] = totals["nats"] / totals["tokens"]
        metrics["val_bpb"] = totals["nats"] / math.log(2) / max(totals["bytes"], 1)
        return metrics
    return evaluate


def main(argv=None):
    started = time.time()
    cfg = parse_config(PretrainConfig, __doc__.split("\n\n")[0].strip(), argv, presets=PRESETS)
    check_train_config(cfg)        # bad flags fail now, not after minutes of data preparation
    if not cfg.init_from:
        check_objective(cfg.objective, model_config(cfg, cfg.vocab_size))
    rt = setup_runtime(cfg)

    # 1. data: the main process builds what is missing, the others then find it cached
    if rt.is_main:
        tokenizer, bin_dir, train_splits, val_splits = prepare_data(cfg, verbose=True)
    if rt.distributed:
        torch.distributed.barrier()
    if not rt.is_main:
        tokenizer, bin_dir, train_splits, val_splits = prepare_data(cfg, verbose=False)
    dtype = token_dtype(tokenizer.vocab_size)
    train_bins = {name: TokenBin(bin_dir / f"{name}.bin", dtype) for name in train_splits}
    if len(train_bins) == 1:
        train_data = next(iter(train_bins.values()))
    else:  # the default corpus: English and Chinese mixed in every batch
        if not 0 <= cfg.zh_share < 1:
            raise ValueError(f"--zh_share {cfg.zh_share}: must be in [0, 1)")
        train_data = MixedBatches(train_bins, {"train_en": 1 - cfg.zh_share, "train_zh": cfg.zh_share})
    val_bins = {name: TokenBin(bin_dir / f"{name}.bin", dtype) for name in val_splits}

    # 2. model: fresh, or continued from a checkpoint
    if cfg.init_from:
        model, ckpt_config = load_checkpoint(cfg.init_from)
        check_tokenizer_matches(ckpt_config, tokenizer, cfg.init_from)
        note_checkpoint_config_wins(cfg, model.config, argv)
    else:
        model = build_model(model_config(cfg, tokenizer.vocab_size, start_id=tokenizer.eot_id))
    objective = check_objective(cfg.objective, model.config)
    if rt.is_main:
        print(model.summary())
        print("data: " + ", ".join(f"{n} {len(b):,}" for n, b in train_bins.items()) + " training tokens, "
              + ", ".join(f"{n} {len(b):,}" for n, b in val_bins.items())
              + f"; {cfg.batch_size * cfg.grad_accum * rt.world_size * model.config.block_size:,} tokens per step"
              + f" on {rt.device} ({str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es))")

    # 3. train
    block_size = model.config.block_size

    to_batch = (lambda x, y: (x, y)) if objective == "next_token" else \
        (lambda x, y: as_next_span(x, y, model.config.decoder_start_id))

    def next_batch(generator):
        return to_batch(*train_data.random_batch(cfg.batch_size, block_size, generator))

    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.long, device=rt.device)
    evaluate = bits_per_byte_evaluator(val_bins, token_bytes, block_size, cfg.batch_size * 2, rt.device, to_batch)
    meta = {"tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
            "data": [str(p) for p in cfg.data] or "default"}
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="pretrain")

    # 4. final numbers: the saved (best) weights on all of the validation text
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir)
        best.to(rt.device).eval()
        with torch.no_grad(), rt.autocast():
            final = evaluate(best, None)
        metrics = {**final, "val_bpb_en": final.get("val_bpb_en"), "val_bpb_zh": final.get("val_bpb_zh"),  # fixed keys
                   "params": best.num_params(), "tokens": result["tokens"],
                   "tokens_per_second": round(result["tokens_per_second"], 1),
                   "seconds": round(result["seconds"], 1), "wall_seconds": round(time.time() - started, 1),
                   "steps": result["step"], "device": str(rt.device), "world_size": rt.world_size}
        write_metrics(Path(cfg.out_dir), metrics)
        langs = ", ".join(f"{k[-2:]} {v:.3f}" for k, v in metrics.items() if k.startswith("val_bpb_") and v)
        print(f"pretrain: val bpb {metrics['val_bpb']:.3f}" + (f" ({langs})" if langs else "")
              + f", val loss {metrics['val_loss']:.3f}, "
              f"{metrics['params'] / 1e6:.2f}M params, {metrics['tokens']:,} tokens in {metrics['seconds']:.0f}s "
              f"({metrics['tokens_per_second']:,.0f} tok/s) -> {cfg.out_dir}/")
        if cfg.sample_tokens:
            prompt = torch.tensor([tokenizer.encode_ordinary("\n")], device=rt.device)
            new = best.generate_stream(prompt, cfg.sample_tokens, temperature=0.8, top_k=50,
                                       generator=torch.Generator(device=rt.device).manual_seed(cfg.seed))
            print("sample:\n" + tokenizer.decode([t.item() for t in new]).strip())
    if rt.distributed:
        # shut down together: a process that tears its connections down while another still
        # holds them open can abort at exit (seen once with gloo on CPU)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
