"""
training.py -- what every stage needs the same way, written once.

    parse_config      argparse flags generated from a config dataclass (+ presets)
    setup_runtime     device, dtype/autocast, seeds, torchrun DDP (gloo on CPU, nccl on CUDA)
    make_optimizer    AdamW (weight decay on matrices only, fused on CUDA), optionally
                      Muon for the blocks' matrices (orthogonalized momentum updates)
    lr_at             linear warmup, then cosine decay to min_lr, over steps or a time budget
    save_checkpoint / load_checkpoint   atomic files, torch.load(weights_only=True)
    run_training      the loop: accumulation, clipping, tqdm, eval, best checkpoint,
                      resumable state, CSV log, loss.png, metrics.json
    main_guard        turns bad input into one clear line instead of a traceback

A stage script (pretrain.py, full_sft.py, ...) supplies only what is its own: the
data, the batches and the evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, ModelConfig, add_lora, build_model, lora_state_dict

ROOT = Path(__file__).resolve().parent
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.pt", "adapter_config.json"   # a LoRA adapter folder (lora.py)
WEIGHTS_FILE = "model.pt"      # weights only (the best checkpoint): state_dict of tensors
RESUME_FILE = "resume.pt"      # everything needed to continue: weights, optimizer, step, RNG
CONFIG_FILE = "config.json"    # model config, tokenizer, training arguments
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer, so a checkpoint stands alone
METRICS_FILE = "metrics.json"
LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"


def arg(default, help: str, **kwargs):
    """A config field with its --help text (and optional argparse extras such as choices)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Flags shared by every training stage. Stages subclass this and add their own."""
    out_dir: str = arg("weight/stage", "folder for weights, config.json, metrics.json, log.csv, loss.png")
    init_from: str = arg("", "checkpoint folder to start from ('' = random init)")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = arg("auto", "auto (bf16 on CUDA and on CPUs with bf16 instructions, else fp32) | float32 | bfloat16",
                     choices=["auto", "float32", "bfloat16"])
    compile: bool = arg(False, "torch.compile the model (worth it on a GPU)")
    seed: int = arg(1337, "random seed (data order, init, dropout)")
    max_steps: int = arg(1000, "optimizer steps (at most, with --time_budget)")
    time_budget: float = arg(0.0, "stop after this many seconds of training steps (0 = off); the learning-rate "
                                  "schedule then follows the clock, so a slower machine trains fewer steps "
                                  "but still finishes its schedule")
    batch_size: int = arg(16, "sequences per micro-batch (per process)")
    grad_accum: int = arg(1, "micro-batches accumulated per optimizer step")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr: float = arg(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only; with Muon the blocks' matrices get none)")
    optimizer: str = arg("adamw", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)",
                         choices=["adamw", "muon"])
    muon_lr_ratio: float = arg(10.0, "with --optimizer muon: Muon's learning rate = lr * this")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)")
    eval_interval: int = arg(100, "evaluate (and save a resumable checkpoint) every N steps")
    eval_tokens: int = arg(32768, "tokens per validation split in periodic evals (the final eval uses all)")
    log_interval: int = arg(10, "write a training-loss row to log.csv every N steps")
    resume: bool = arg(False, "continue from out_dir/resume.pt (model, optimizer, step, RNG)")
    overwrite: bool = arg(False, "start afresh even if out_dir already holds a trained model")


# ----------------------------------------------------------------------------------
# Flags


def parse_config(cls, description: str, argv=None, presets: Optional[dict[str, dict]] = None):
    """Build an argparse parser from the fields of dataclass `cls` and parse argv.

    Every field becomes --name (bools get --name / --no-name). With presets, --preset
    NAME first replaces the defaults by the preset's values; explicit flags still win.
    """
    check_architecture_flags(cls, argv if argv is not None else sys.argv[1:])
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named set of defaults; flags given explicitly override it")
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        value_type = meta.pop("type", type(f.default))
        nargs = meta.pop("nargs", None)          # "*" or "+": a list of values (--target_modules q_proj v_proj)
        if value_type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        elif nargs:
            parser.add_argument(f"--{f.name}", nargs=nargs, type=value_type, default=f.default, help=help_text, **meta)
        else:
            parser.add_argument(f"--{f.name}", type=value_type, default=f.default, help=help_text, **meta)
    args = parser.parse_args(argv)
    values = vars(args)
    preset = values.pop("preset", None)
    if preset:
        # a preset changes a value only where the user left the flag at its default
        given = {a.split("=")[0].lstrip("-").replace("no-", "", 1) for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for name, value in presets[preset].items():
            if name not in given:
                values[name] = value
    cfg = cls(**values)
    cfg.preset = preset
    return cfg


def check_architecture_flags(cls, argv: list[str]):
    """A model-architecture flag (--n_experts, --n_encoder_layer, ...) on a stage that takes its model
    from a checkpoint gets one line saying why it cannot apply, instead of argparse's 'unrecognized'."""
    own = {f.name for f in dataclasses.fields(cls)}
    for a in argv:
        name = a.split("=")[0].lstrip("-")
        if a.startswith("--") and name in {f.name for f in dataclasses.fields(ModelConfig)} and name not in own:
            raise ValueError(f"--{name} is an architecture flag, but this stage takes its model from --init_from, "
                             f"whose config.json fixes the architecture: pretrain that kind of model first "
                             f"(python pretrain.py --{name} ...) and start from it with --init_from")


# ----------------------------------------------------------------------------------
# Device, precision, distributed


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype          # autocast dtype (float32 = no autocast)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision: matmuls in bf16/fp16, weights and optimizer state stay fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Apple-silicon GPU not available; use --device cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 matmuls are fast.

    Elsewhere PyTorch emulates bf16 on the CPU, which is slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. auto: bf16 on CUDA GPUs and on CPUs with native bf16, else float32.

    Autocast keeps the weights and the optimizer in float32 and runs matmuls in bf16
    (about 1.4x faster training on an AVX512-BF16 CPU, 2x+ on a GPU).
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def setup_runtime(cfg) -> Runtime:
    """Pick device and dtype, seed everything, and join the torchrun group if launched by it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    return Runtime(device, resolve_dtype(cfg.dtype, device), rank, local_rank, world_size)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All global RNG states, as plain types and tensors (so torch.load(weights_only=True) reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on 2-D weights (matmuls, embeddings), none on biases and norms.

    --optimizer muon: the hidden matrices of the blocks (attention and feed-forward; in an
    encoder-decoder the encoder's blocks too) are trained by Muon instead, with lr *
    muon_lr_ratio; embeddings, head, norms and biases stay with AdamW (as in nanochat and
    the modded-nanogpt speedruns).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    use_muon = cfg.optimizer == "muon"
    hidden = [p for n, p in params if use_muon and p.dim() == 2 and n.startswith(("blocks.", "encoder."))]
    hidden_ids = {id(p) for p in hidden}
    decay = [p for n, p in params if p.dim() >= 2 and id(p) not in hidden_ids]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if not use_muon:
        return adamw
    muon = Muon([{"params": hidden, "lr_ratio": cfg.muon_lr_ratio}], lr=cfg.lr * cfg.muon_lr_ratio)
    return OptimizerGroup(adamw, muon)


@torch.no_grad()
def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, by a quintic Newton-Schulz iteration.

    X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315):
    pushes every singular value of X (after scaling it to norm <= 1) towards 1 (into
    about 0.7-1.2 after 5 steps: close enough, and much cheaper than an exact SVD).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T                                  # iterate on the wide side: A is the smaller square
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalize the update: W <- W - lr * sqrt(max(1, rows/cols)) * orth(m).

    m is Nesterov momentum of the gradient. Every direction of the update gets the same
    size, so rare directions learn as fast as common ones. For 2-D hidden matrices only.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])                   # m = beta m + (1 - beta) g
                update = p.grad.lerp(buf, group["momentum"])               # Nesterov: look one step ahead
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(orthogonalize(update), alpha=-group["lr"] * scale)


class OptimizerGroup:
    """Several optimizers stepped as one (the loop sees one param_groups list and one state_dict)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps.

    With a time budget, progress is whichever is further along: steps or seconds
    (training seconds so far / time_budget), so the decay ends when time runs out.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.time_budget > 0:
        progress = max(progress, seconds / cfg.time_budget)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: Path):
    """torch.save to a temp file in the same folder, then rename: never half a file.
    (The temp name carries the process id, so two runs writing the same file never collide.)"""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, model: GPT, meta: dict, tokenizer=None):
    """Weights (model.pt), config.json (model config + meta) and a copy of the tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, out_dir / WEIGHTS_FILE)
    config = {"model": model.config.to_dict(), **meta}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save(out_dir / TOKENIZER_FILE)


def load_checkpoint(ckpt_dir: str | Path, device="cpu", make_hint: str = "python pretrain.py"):
    """Rebuild the model a checkpoint folder describes. Returns (model, config dict).

    Weights are read with weights_only=True: no pickled code runs. A Hugging Face model
    folder (GPT-2, Qwen2, Llama: config.json with a model_type) is converted on the fly.
    """
    ckpt_dir = Path(ckpt_dir)
    from weight.hf import is_hf_folder, load_hf_checkpoint   # weight/hf.py: public weights in and out
    if is_hf_folder(ckpt_dir):
        return load_hf_checkpoint(ckpt_dir, device)
    config_path, weights_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
    if (ckpt_dir / ADAPTER_CONFIG).exists() and not weights_path.exists():
        raise ValueError(f"{ckpt_dir}/ is a LoRA adapter, not a full checkpoint: use --lora {ckpt_dir} (inference, "
                         f"evaluation, serve) or merge it first: `python lora.py --merge --out_dir {ckpt_dir}`")
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: no checkpoint in {ckpt_dir}/; "
                                    f"create one with `{make_hint}`")
    try:
        config = json.loads(config_path.read_text())
        model_config = ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a checkpoint config ({type(e).__name__}: {e}); "
                         f"recreate the checkpoint with `{make_hint}`") from None
    model = build_model(model_config)   # GPT, or Seq2Seq for an encoder-decoder config
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device), config


def weights_checksum(model) -> float:
    """A cheap fingerprint of a model's weights (sum of every weight's mean): tells two bases apart."""
    return round(sum(t.float().mean().item() for t in model.state_dict().values()), 6)


def adapter_base(adapter_config: dict) -> Path:
    """The base checkpoint an adapter names: as written, or relative to the repository (weight/sft)
    when the adapter is used from another working directory."""
    base = Path(adapter_config["init_from"])
    if not base.is_absolute() and not base.exists() and (ROOT / base).exists():
        return ROOT / base
    return base


def load_adapted_model(adapter_dir: str | Path, device="cpu"):
    """Base checkpoint (named in adapter_config.json) + its adapter. Returns (model, adapter config)."""
    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"{adapter_dir / name} not found: train an adapter with `python lora.py`")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    model, base_config = load_checkpoint(adapter_base(config), make_hint="python full_sft.py")
    if base_config.get("tokenizer", {}).get("fingerprint") != config.get("tokenizer", {}).get("fingerprint") \
            or model.config.to_dict() != config.get("base_model") \
            or abs(weights_checksum(model) - config.get("base_checksum", float("nan"))) > 1e-4:
        raise ValueError(f"{adapter_dir} was trained on another base model than {config['init_from']}: "
                         f"use the base it was trained on")
    lora = config["lora"]
    add_lora(model, lora["target_modules"], lora["rank"], lora["alpha"])
    adapter = torch.load(adapter_dir / ADAPTER_FILE, weights_only=True)
    missing = set(lora_state_dict(model)) - set(adapter)
    if missing:
        raise ValueError(f"{adapter_dir / ADAPTER_FILE} lacks {len(missing)} adapter tensors: retrain it")
    model.load_state_dict(adapter, strict=False)
    return model.to(device), config


def load_checkpoint_tokenizer(ckpt_dir: str | Path):
    from tokenizer import Tokenizer  # the plumbing uses the tokenizer only to read a checkpoint's copy
    from weight.hf import is_hf_folder, load_hf_tokenizer
    if is_hf_folder(ckpt_dir):       # a Hugging Face model folder: its own tokenizer files
        return load_hf_tokenizer(ckpt_dir)
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.exists():   # a newly trained tokenizer would not match the weights: say where the right one is
        raise FileNotFoundError(f"{path} not found: copy the tokenizer this model was trained with there "
                                f"(pretrain.py's --tokenizer, by default tokenizer/default.json) or pass --tokenizer")
    return Tokenizer.load(path)


def check_tokenizer_matches(config: dict, tokenizer, where: str):
    """A checkpoint trained with one tokenizer gives garbage with another: refuse clearly."""
    expected = config.get("tokenizer", {}).get("fingerprint")
    if expected and expected != tokenizer.fingerprint:
        raise ValueError(f"{where} was trained with tokenizer {expected}, but the tokenizer given is "
                         f"{tokenizer.fingerprint}: use the checkpoint's own {TOKENIZER_FILE} or retrain")


# ----------------------------------------------------------------------------------
# Logging


class CsvLog:
    """Rows of {step, ...} appended to log.csv; on resume, rows after the resumed step are dropped."""

    COLUMNS = ["step", "tokens", "seconds", "lr", "train_loss", "val_loss", "val_bpb"]

    def __init__(self, path: Path, resume_step: Optional[int] = None, extra_columns=()):
        self.path = path
        self.columns = self.COLUMNS + [c for c in extra_columns if c not in self.COLUMNS]
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_log(csv_path: Path, png_path: Path, title: str):
    """loss.png: training loss and validation loss against steps (bpb on a second axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return zip(*pts) if pts else ((), ())

    experts = [c for c in (rows[0] if rows else {}) if c.startswith("expert_")]
    if experts:   # Mixture of Experts: a second panel with each expert's share of the routed tokens
        fig, (ax, ax_moe) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("train_loss"), label="train loss", alpha=0.7)
    ax.plot(*series("val_loss"), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    bpb_steps, bpb = series("val_bpb")
    if bpb:
        ax2 = ax.twinx()
        ax2.plot(bpb_steps, bpb, "s--", color="tab:green", label="val bpb")
        ax2.set_ylabel("bits per byte")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(title)
    if experts:
        for column in experts:
            ax_moe.plot(*series(column), ".-", label=column.replace("_", " "), alpha=0.8)
        ax_moe.axhline(1 / len(experts), color="gray", ls="--", lw=1, label="balanced")
        ax_moe.set_xlabel("step")
        ax_moe.set_ylabel("share of routed tokens")
        ax_moe.grid(alpha=0.3)
        ax_moe.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    tmp = png_path.with_name("tmp-" + png_path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------------
# The training loop


def check_train_config(cfg: TrainConfig):
    """One clear line for training flags that cannot work (called before any data is prepared)."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"need 0 <= --min_lr <= --lr and --lr > 0, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.time_budget < 0:
        raise ValueError(f"--time_budget must be >= 0 seconds (0 = off), got {cfg.time_budget}")
    for weights, what in ((WEIGHTS_FILE, "a trained model"), (ADAPTER_FILE, "an adapter")):
        if not cfg.resume and not cfg.overwrite and (Path(cfg.out_dir) / weights).exists():
            # a fresh run would replace the trained weights with step-0 ones: never do that silently
            raise ValueError(f"{cfg.out_dir}/ already holds {what}: add --resume to continue it, "
                             f"--overwrite to start over, or choose another --out_dir")


def run_training(model: GPT, cfg: TrainConfig, rt: Runtime, next_batch: Callable,
                 evaluate: Callable, meta: dict, tokenizer=None, stage: str = "train",
                 save_weights: Callable = None, compute_loss: Callable = None) -> dict:
    """Train `model` for cfg.max_steps optimizer steps (or cfg.time_budget seconds) and return the final metrics.

    next_batch(generator) -> a tuple of CPU tensors: (x, y), (B, T) each, with y = -100 where
    the loss is ignored; (source, decoder input, targets, pad lengths) for an encoder-decoder;
    DPO's chosen and rejected sequences. batch[0].numel() counts as the step's tokens.
    compute_loss(model, batch) -> scalar loss; default: the model's own loss, model(*batch)[1].
    evaluate(model, max_tokens) -> dict with at least "val_loss" (lower is better).
    meta: what config.json records besides the model config (tokenizer, arguments, stage).

    Every eval_interval steps: evaluate, save the weights if val_loss is the best so far
    (model.pt; or save_weights(out_dir, model, meta, tokenizer), e.g. a LoRA adapter only),
    and save everything needed to resume (resume.pt).
    """
    save_weights = save_weights or save_checkpoint
    compute_loss = compute_loss or (lambda m, batch: m(*batch)[1])
    out_dir = Path(cfg.out_dir)
    check_train_config(cfg)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    batch_rng = torch.Generator().manual_seed(cfg.seed + rt.rank)  # data order, saved for resume
    state = {"step": 0, "best_val_loss": float("inf"), "tokens": 0, "seconds": 0.0}

    resume_path = out_dir / RESUME_FILE
    if cfg.resume:
        if not resume_path.exists():
            raise FileNotFoundError(f"{resume_path} not found: nothing to resume; drop --resume to start fresh")
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, KeyError, ValueError):
            raise ValueError(f"{resume_path} was saved by a run with a different model or --optimizer: "
                             f"resume with the flags of that run (see {out_dir / CONFIG_FILE})") from None
        if rt.rank < len(saved["batch_rng"]):
            batch_rng.set_state(saved["batch_rng"][rt.rank])
        else:  # more processes than the saved run: new ranks get their own fresh data order
            batch_rng.manual_seed(cfg.seed + rt.rank + 1_000_003 * saved["state"]["step"])
        set_rng_state(saved["rng"])
        state = saved["state"]
        if rt.is_main:
            print(f"resuming from {resume_path} at step {state['step']}")

    train_model = torch.compile(model) if cfg.compile else model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    tokens_per_step = None
    n_experts = model.config.n_experts               # MoE: log each expert's share of the routed tokens
    expert_columns = [f"expert_{e}" for e in range(n_experts)] + ["moe_aux_loss"] * bool(n_experts)
    log = CsvLog(out_dir / LOG_FILE, resume_step=state["step"] if cfg.resume else None,
                 extra_columns=expert_columns) if rt.is_main else None
    meta = {**meta, "stage": stage, "train": dataclasses.asdict(cfg)}

    def eval_and_checkpoint(step: int):
        """Evaluate, keep the best weights, write a resumable state (main process writes)."""
        batch_rng_states = gather_rng_states(batch_rng, rt)   # every process takes part
        if not rt.is_main:
            return None
        routing = model.moe_stats()          # MoE: how the training steps since the last eval routed tokens
        model.eval()
        with torch.no_grad(), rt.autocast():
            metrics = evaluate(model, cfg.eval_tokens)
        model.train()
        model.moe_stats()                    # forget the evaluation's own routing
        if routing:
            metrics["moe_aux_loss"] = routing["moe_aux_loss"]
            metrics["expert_share_max"] = max(routing["expert_share"]) * n_experts   # 1.0 = perfectly balanced
            if routing["dropped_share"]:
                metrics["dropped_share"] = routing["dropped_share"]
        log.write(step=step, tokens=state["tokens"], seconds=state["seconds"], **metrics,
                  **{f"expert_{e}": share for e, share in enumerate(routing.get("expert_share", []))})
        improved = metrics["val_loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = metrics["val_loss"]
            save_weights(out_dir, model, {**meta, "step": step, "metrics": metrics}, tokenizer)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        tqdm.write(f"step {step}: {shown}" + (" (best, saved)" if improved else ""))
        state["step"] = step
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "batch_rng": batch_rng_states, "rng": rng_state(),
                     "state": dict(state)}, resume_path)
        return metrics

    model.train()
    start_step = state["step"]
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               desc=stage, disable=not rt.is_main, dynamic_ncols=True)
    metrics = {}
    end_step = start_step
    for step in bar:
        if cfg.time_budget > 0 and state["seconds"] >= cfg.time_budget:
            tqdm.write(f"time budget of {cfg.time_budget:.0f}s reached after {step} steps")
            break
        if step % cfg.eval_interval == 0 and (step > start_step or not cfg.resume):
            metrics = eval_and_checkpoint(step) or metrics
            if rt.distributed:
                dist.barrier()
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, state["seconds"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        loss_sum, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = [t.to(rt.device, non_blocking=True) for t in next_batch(batch_rng)]
            # in DDP, only the last micro-batch synchronises gradients across processes
            sync = contextlib.nullcontext() if (not rt.distributed or micro == cfg.grad_accum - 1) \
                else train_model.no_sync()
            with sync, rt.autocast():
                loss = compute_loss(train_model, batch) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            step_tokens += batch[0].numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rt.distributed and cfg.time_budget > 0:
            # every process must see the same clock: it sets the learning rate and when to stop
            dt_all = torch.tensor([dt], device=rt.device)
            dist.all_reduce(dt_all, op=dist.ReduceOp.MAX)
            dt = dt_all.item()
        state["seconds"] += dt
        end_step = step + 1
        state["tokens"] += step_tokens * rt.world_size
        tokens_per_step = step_tokens * rt.world_size
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if rt.is_main and (step % cfg.log_interval == 0 or step == cfg.max_steps - 1):
            log.write(step=step + 1, tokens=state["tokens"], seconds=state["seconds"], lr=lr, train_loss=loss_sum)
    bar.close()

    # the last step always ends with an evaluation and a resumable state
    if end_step > start_step:
        metrics = eval_and_checkpoint(end_step) or metrics
    if rt.distributed:
        dist.barrier()
    if rt.is_main:
        plot_log(out_dir / LOG_FILE, out_dir / PLOT_FILE, f"{stage}: {out_dir}")
    return {"step": end_step, "tokens": state["tokens"], "seconds": state["seconds"],
            "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9), **(metrics or {})}


def gather_rng_states(generator: torch.Generator, rt: Runtime) -> list:
    """Every process's data-order RNG, so a resumed DDP run sees the same batches."""
    mine = generator.get_state()
    if not rt.distributed:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def write_metrics(out_dir: Path, metrics: dict):
    atomic_write_text(Path(out_dir) / METRICS_FILE, json.dumps(metrics, indent=2))


# ----------------------------------------------------------------------------------
# Clear errors


def main_guard(main: Callable):
    """Run main(); bad input (ValueError, FileNotFoundError) becomes one line on stderr.

    Set WORKSHOP_DEBUG=1 to see the full traceback instead.
    """
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("WORKSHOP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:          # output piped into a reader that stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        sys.exit(0)
