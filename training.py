"""
training.py -- the training loop every stage shares, and the flags it reads.

    run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer)

        for each step:     loss of next_batch() (micro-batches accumulated), backward,
                           clip the gradient norm, optimizer step (optim.py)
        every eval_interval steps and at the end:
                           evaluate(model) on held-out data, keep the best weights
                           (weight/checkpoint.py), save a resumable state (resume.pt)
        along the way:     a progress bar, log.csv, loss.png

A stage script (pretrain.py, full_sft.py, ...) supplies only what is its own: the data,
its batches, its loss if it is not the plain next-token loss, and its evaluation.
Everything about one run can be resumed: weights, optimizer, step, data order, RNG.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from atomic import atomic_path, atomic_write_text, remove_stale_temps
from flags import arg, explicit_flags
from model import moe_layers
from optim import lr_at, make_optimizer
from runtime import Runtime
from weight.checkpoint import ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, RESUME_FILE, WEIGHTS_FILE, save_checkpoint
from weight.hf import is_hf_folder

LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"


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
    max_steps: int = arg(1000, "optimizer steps: the work a run does, the same on every machine (a slower "
                               "one takes longer and trains the same model)")
    time_budget: float = arg(0.0, "stop after this many seconds of training steps instead (0 = off): the "
                                  "learning-rate schedule then follows the clock, so a slower machine trains "
                                  "fewer steps, and a different model")
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
    eval_tokens: int = arg(32768, "held-out tokens scored in periodic evaluations (0 = all; the final one "
                                  "always scores all)")
    log_interval: int = arg(10, "write a training-loss row to log.csv every N steps")
    resume: bool = arg(False, "continue from out_dir/resume.pt (model, optimizer, step, RNG)")
    overwrite: bool = arg(False, "start afresh even if out_dir already holds a trained model")


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
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:   # the kept rows, or a fresh header
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_log(csv_path: Path, png_path: Path, title: str):
    """loss.png: training loss and validation loss against steps (bpb or accuracy on a second axis)."""
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
    # a second axis for the evaluation's own figure: pretraining's bits per byte, DPO's preference
    # accuracy, GRPO's held-out accuracy (the first that log.csv has)
    for key, label in (("val_bpb", "bits per byte"), ("preference_accuracy", "preference accuracy"),
                       ("heldout_accuracy", "held-out accuracy")):
        steps, values = series(key)
        if values:
            ax2 = ax.twinx()
            ax2.plot(steps, values, "s--", color="tab:green", label=label)
            ax2.set_ylabel(label)
            ax2.legend(loc="upper center")
            break
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
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------
# The training loop


def pretrained_defaults_note(cfg: TrainConfig, ckpt_config: dict, stage_script: str) -> Optional[str]:
    """A line for a fine-tuning stage started from an imported model (.gguf, Hugging Face) with the stage's own
    default learning rate, sized for the workshop's small model; None otherwise (a preset, a learning rate of
    one's own, or our own checkpoint)."""
    if ckpt_config.get("stage") not in ("gguf_import", "hf_import") or getattr(cfg, "preset", None) \
            or cfg.lr != type(cfg)().lr:
        return None
    return (f"note: {cfg.init_from} is a pretrained model; this run uses {stage_script}'s defaults for the workshop's "
            f"small model (lr {cfg.lr:g}, {cfg.max_steps:,} steps of {cfg.batch_size}): a pretrained model wants a far "
            f"smaller learning rate and fewer steps; `python {stage_script} --preset smollm2` has measured ones")


def check_train_config(cfg: TrainConfig):
    """One clear line for training flags that cannot work (called before any data is prepared)."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"need 0 <= --min_lr <= --lr and --lr > 0, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.time_budget < 0:
        raise ValueError(f"--time_budget must be >= 0 seconds (0 = off), got {cfg.time_budget}")
    if getattr(cfg, "max_new_tokens", 0) < 0:      # the stages that generate answers to score them
        raise ValueError(f"--max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    if is_hf_folder(cfg.out_dir):
        # a checkpoint's config.json and tokenizer.json would replace the folder's own, beside its safetensors
        raise ValueError(f"--out_dir {cfg.out_dir} is a Hugging Face model folder: training writes the project's "
                         f"checkpoint files there, replacing its config.json and tokenizer.json; choose another "
                         f"--out_dir (start from it with --init_from {cfg.out_dir})")
    for weights, what in ((WEIGHTS_FILE, "a trained model"), (ADAPTER_FILE, "an adapter")):
        if not cfg.resume and not cfg.overwrite and (Path(cfg.out_dir) / weights).exists():
            # a fresh run would replace the trained weights with step-0 ones: never do that silently
            raise ValueError(f"{cfg.out_dir}/ already holds {what}: add --resume to continue it, "
                             f"--overwrite to start over, or choose another --out_dir")


def run_training(model, cfg: TrainConfig, rt: Runtime, next_batch: Callable, evaluate: Callable, meta: dict,
                 tokenizer, stage: str, compute_loss: Callable, save_weights: Callable = None,
                 log_columns: tuple = ()) -> dict:
    """Train `model` for cfg.max_steps optimizer steps (or cfg.time_budget seconds) and return the final metrics.

    next_batch(generator) -> a tuple of CPU tensors, the stage's batch: pretraining's (x, y), SFT's
    (x, y, answer_mask), DPO's chosen and rejected sequences ... batch[0].numel() counts as the
    step's tokens. compute_loss(model, batch) -> the scalar loss of that batch (the stage's idea:
    next-token loss, answers only, the DPO loss).
    evaluate(model, max_tokens) -> dict with at least "val_loss" (lower is better); periodic
    evaluations pass cfg.eval_tokens, a budget the evaluation may stop at (0 = everything).
    meta: what config.json records besides the model config (tokenizer, arguments, stage).

    Every eval_interval steps: evaluate, save the weights if val_loss is the best so far
    (model.pt; or save_weights(out_dir, model, meta, tokenizer), e.g. a LoRA adapter only),
    and save everything needed to resume (resume.pt). log.csv gets train and validation loss, and
    the evaluation's own figures named in log_columns (DPO's preference accuracy, say).
    """
    save_weights = save_weights or save_checkpoint
    out_dir = Path(cfg.out_dir)
    check_train_config(cfg)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the weights here are about to change: a metrics.json of an earlier run no longer describes
        # them (a run cut off now must not look finished); the stage writes a new one at the end
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
        # a run killed mid-write (kill -9, out of memory) leaves the temp file of the file it was writing
        # (model.pt.<pid>.tmp, ...) beside the complete old one: this run owns the folder now, clear them
        stale = remove_stale_temps(out_dir)
        if stale:
            print(f"removed {', '.join(p.name for p in stale)}: half-written by an earlier run that was killed")
    model.to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    batch_rng = torch.Generator().manual_seed(cfg.seed + rt.rank)  # data order, saved for resume
    state = {"step": 0, "best_val_loss": float("inf"), "tokens": 0, "seconds": 0.0, "start_val_loss": None}
    meta = {**meta, "stage": stage, "train": {**dataclasses.asdict(cfg), "preset": getattr(cfg, "preset", None)}}
    run = {"train": meta["train"], "model": dataclasses.asdict(model.config), "tokenizer": meta.get("tokenizer")}

    resume_path = out_dir / RESUME_FILE
    if cfg.resume:
        state = {"start_val_loss": None, **load_resume_state(resume_path, model, optimizer, batch_rng, cfg, rt, run)}

    train_model = torch.compile(model) if cfg.compile else model
    if rt.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    tokens_per_step = None
    routing = RoutingLog(model)                      # MoE: each expert's share of the routed tokens
    n_experts = model.config.n_experts
    expert_columns = [f"expert_{e}" for e in range(n_experts)] + ["moe_aux_loss"] * bool(n_experts)
    log = CsvLog(out_dir / LOG_FILE, resume_step=state["step"] if cfg.resume else None,
                 extra_columns=list(log_columns) + expert_columns) if rt.is_main else None

    def eval_and_checkpoint(step: int):
        """Evaluate, keep the best weights, write a resumable state (main process writes)."""
        batch_rng_states = gather_rng_states(batch_rng, rt)   # every process takes part
        if not rt.is_main:
            return None
        routed = routing.read()              # MoE: how the training steps since the last eval routed tokens
        model.eval()
        with torch.no_grad(), rt.autocast():
            metrics = evaluate(model, cfg.eval_tokens)
        model.train()
        if routed:
            metrics["moe_aux_loss"] = routed["moe_aux_loss"]
            metrics["expert_share_max"] = max(routed["expert_share"]) * n_experts   # 1.0 = perfectly balanced
            if routed["dropped_share"]:
                metrics["dropped_share"] = routed["dropped_share"]
        log.write(step=step, tokens=state["tokens"], seconds=state["seconds"], **metrics,
                  **{f"expert_{e}": share for e, share in enumerate(routed.get("expert_share", []))})
        # step 0 is the starting point (random, or the previous stage's model): it is measured, never
        # kept as the result, so a run always saves weights it trained
        if step == 0:
            state["start_val_loss"] = metrics["val_loss"]
        improved = step > 0 and metrics["val_loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = metrics["val_loss"]
            save_weights(out_dir, model, {**meta, "step": step, "metrics": metrics}, tokenizer)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        tqdm.write(f"step {step}: {shown}" + (" (best, saved)" if improved else ""))
        state["step"] = step
        # kept with the resumable state: a run killed after its last checkpoint but before the stage wrote
        # metrics.json has no step left when resumed, and returns these (not an empty dict: no val_loss).
        # Plain numbers only (a numpy float becomes a float), so torch.load(weights_only=True) reads them.
        state["metrics"] = {k: float(v) if isinstance(v, float) else v for k, v in metrics.items()
                            if isinstance(v, (int, float, str))}
        with atomic_path(resume_path) as tmp:
            torch.save({"model": trained_state(model), "optimizer": optimizer.state_dict(),
                        "batch_rng": batch_rng_states, "rng": rng_state(), "state": dict(state), "run": run}, tmp)
        return metrics

    # under torchrun, the launcher is this process's parent. It starts its workers in sessions of their own,
    # so a kill -9 of torchrun (or of its process group) does not reach them: they would train on, unseen,
    # writing into out_dir while the user starts the run again. Each step checks that the launcher lives.
    launcher = os.getppid() if rt.distributed else None

    model.train()
    start_step = state["step"]
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               desc=stage, disable=not rt.is_main, dynamic_ncols=True)
    metrics = dict(state.get("metrics") or {})       # the last evaluation's, until this run evaluates
    end_step = start_step
    eval_seconds = timed_from = 0.0
    for step in bar:
        if launcher is not None and os.getppid() != launcher:   # our parent died: we were handed to init
            raise SystemExit(f"rank {rt.rank}: the torchrun that started this process is gone (killed?); "
                             f"stopping at step {step}, before any more files are written: run torchrun again "
                             f"with --resume to continue from the last checkpoint")
        if cfg.time_budget > 0 and state["seconds"] >= cfg.time_budget:
            tqdm.write(f"time budget of {cfg.time_budget:.0f}s reached after {step} steps")
            break
        if step % cfg.eval_interval == 0 and (step > start_step or not cfg.resume):
            eval_started = time.perf_counter()
            metrics = eval_and_checkpoint(step) or metrics
            if rt.distributed:
                dist.barrier()
            eval_seconds = time.perf_counter() - eval_started
        if step == start_step + ESTIMATE_AFTER_STEPS + 1 and rt.is_main:
            tqdm.write(estimate_line(stage, cfg, step, (state["seconds"] - timed_from) / ESTIMATE_AFTER_STEPS,
                                     eval_seconds))
        if step == start_step + 1:
            timed_from = state["seconds"]                 # the first step is a warm-up: time the next ones
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
    routing.close()
    if rt.is_main:
        plot_log(out_dir / LOG_FILE, out_dir / PLOT_FILE, f"{stage}: {out_dir}")
        start = state["start_val_loss"]
        if start is not None and start <= state["best_val_loss"]:
            tqdm.write(f"note: before training the validation loss was {start:.4f}, the best trained step's "
                       f"{state['best_val_loss']:.4f}: training did not help on held-out data (the trained "
                       f"weights are saved; a lower --lr, more steps or more data may)")
    return {"step": end_step, "tokens": state["tokens"], "seconds": state["seconds"],
            "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9), **(metrics or {})}


def frozen_names(model) -> list[str]:
    """The state_dict keys of parameters that do not train (a LoRA's base): resume.pt leaves them out, since
    the stage loads them again from --init_from (for SmolLM2 that is 540 MB not rewritten at every evaluation)."""
    return [k for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter) and not v.requires_grad]


def trained_state(model) -> dict:
    """model.state_dict() without the frozen parameters: what a resumable checkpoint must keep."""
    frozen = set(frozen_names(model))
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_resume_state(resume_path: Path, model, optimizer, batch_rng: torch.Generator, cfg: TrainConfig,
                      rt: Runtime, run: dict) -> dict:
    """Continue a run: weights, optimizer, data order and every RNG from resume.pt; returns the loop's state.
    run: this run's flags, model and tokenizer; the tokenizer must be the one the saved run used."""
    if not resume_path.exists():
        raise FileNotFoundError(f"{resume_path} not found: nothing to resume; drop --resume to start fresh")
    saved = torch.load(resume_path, map_location="cpu", weights_only=True)
    was = ((saved.get("run") or {}).get("tokenizer") or {}).get("fingerprint")
    now = (run.get("tokenizer") or {}).get("fingerprint")
    if was and now and was != now:
        # same ids, different meanings: the weights would go on learning under new token ids
        raise ValueError(f"{resume_path} was trained with tokenizer {was}, this run has {now} (the tokenizer file "
                         f"changed since): resume with the one it used ({resume_path.parent}/tokenizer.json is "
                         f"its copy, once weights were saved) or start over with --overwrite")
    try:
        missing, unexpected = model.load_state_dict(saved["model"], strict=False)
        if unexpected or set(missing) != set(frozen_names(model)):
            raise KeyError("the saved tensors are not this model's")
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, KeyError, ValueError):
        raise ValueError(f"{resume_path} was saved by a run with a different model or --optimizer: "
                         f"resume with the flags of that run (see {resume_path.parent / CONFIG_FILE})") from None
    if rt.rank < len(saved["batch_rng"]):
        batch_rng.set_state(saved["batch_rng"][rt.rank])
    else:  # more processes than the saved run: new ranks get their own fresh data order
        batch_rng.manual_seed(cfg.seed + rt.rank + 1_000_003 * saved["state"]["step"])
    set_rng_state(saved["rng"])
    if rt.is_main:
        print(f"resuming from {resume_path} at step {saved['state']['step']}")
    return saved["state"]


# What a resumed run may change when given again: how long it runs and how it runs or reports, never
# what it learns from (a --tokenizer given again is checked by its fingerprint when the run resumes).
MAY_CHANGE_ON_RESUME = {"max_steps", "time_budget", "eval_interval", "eval_tokens", "log_interval", "device", "dtype",
                        "compile", "tokenizer"}


def resumed_flags(cfg, argv=None, model_flags: Optional[dict] = None):
    """--resume continues a run with the flags it was started with (its data, tokenizer, model, learning
    rate, ...), read from out_dir/resume.pt: a flag left out is taken from there, a flag given now that
    contradicts it is refused in one line. Returns cfg (and model_flags, for pretrain.py)."""
    path = Path(cfg.out_dir) / RESUME_FILE
    run = None
    if cfg.resume and path.exists():
        run = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run")
    if run is None:                       # nothing to resume (the loop says so), or a resume.pt of an older version
        return cfg if model_flags is None else (cfg, model_flags)
    given = explicit_flags(list(argv if argv is not None else sys.argv[1:])) | {"resume", "overwrite"}

    def plain(value):                     # a list and a tuple of the same names are the same flag value
        return list(value) if isinstance(value, (list, tuple)) else value
    taken = []
    for saved, current in ((run["train"], dataclasses.asdict(cfg)), (run["model"], model_flags or {})):
        for name, now in current.items():
            if name not in saved or plain(now) == plain(saved[name]):
                continue
            if name in given:
                if name in MAY_CHANGE_ON_RESUME or name in ("resume", "overwrite"):
                    continue
                raise ValueError(f"--{name} {now}: {cfg.out_dir} was started with --{name} {saved[name]}, and a "
                                 f"resumed run keeps its flags: drop --{name}, or start over with --overwrite")
            if current is model_flags:
                model_flags[name] = saved[name]
            else:
                setattr(cfg, name, saved[name])
                shown = " ".join(map(str, saved[name])) if isinstance(saved[name], (list, tuple)) else saved[name]
                taken.append(f"--{name} {shown}")
    if taken and os.environ.get("RANK", "0") == "0":         # (under torchrun: once)
        print(f"resume: the run's own flags, from {path}: {' '.join(taken)}" + " (and its model)" * bool(model_flags))
    return cfg if model_flags is None else (cfg, model_flags)


def gather_rng_states(generator: torch.Generator, rt: Runtime) -> list:
    """Every process's data-order RNG, so a resumed DDP run sees the same batches."""
    mine = generator.get_state()
    if not rt.distributed:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


ESTIMATE_AFTER_STEPS = 4      # a run says how long it will take once this many steps are timed


def estimate_line(stage: str, cfg: TrainConfig, step: int, step_seconds: float, eval_seconds: float) -> str:
    """'sft: 1,200 steps to go, about 5.1 min here (0.24 s a step, 9 evaluations of 1.0 s)'."""
    steps_left = cfg.max_steps - step
    evals_left = steps_left // cfg.eval_interval + 1                 # the periodic ones and the final one
    seconds = steps_left * step_seconds + evals_left * eval_seconds
    if cfg.time_budget > 0:
        seconds = min(seconds, max(0.0, cfg.time_budget - step * step_seconds) + evals_left * eval_seconds)
    return (f"{stage}: {steps_left:,} steps to go, about {seconds / 60:.1f} min here ({step_seconds:.2f} s a step, "
            f"{evals_left} evaluations of {eval_seconds:.1f} s)"
            + (f"; stops after {cfg.time_budget:.0f} s of steps" if cfg.time_budget > 0 else ""))


def write_metrics(out_dir: Path, metrics: dict):
    atomic_write_text(Path(out_dir) / METRICS_FILE, json.dumps(metrics, indent=2))


class RoutingLog:
    """Mixture of Experts: how the training steps route tokens, summed between two reads.

    A forward hook on every MoE layer adds up its routed slots per expert, balance loss and
    dropped tokens after each training forward pass (evaluation passes do not count).
    """

    def __init__(self, model):
        self.layers = moe_layers(model)
        self.hooks = [layer.register_forward_hook(self.count) for layer in self.layers]
        self.reset()

    def reset(self):
        self.load, self.aux, self.calls, self.dropped = 0, 0, 0, 0   # load and aux stay on the device until read

    def count(self, layer, inputs, output):
        if layer.training:
            self.load = self.load + layer.load                         # (E,) routed slots per expert
            self.aux = self.aux + layer.aux_loss.detach()
            self.calls += 1
            self.dropped += layer.dropped

    def read(self) -> dict:
        """Since the last read: mean balance loss, share of routed slots per expert, dropped share."""
        if not self.calls:
            return {}
        load = self.load.float().cpu()
        stats = {"moe_aux_loss": float(self.aux) / self.calls, "expert_share": (load / load.sum()).tolist(),
                 "dropped_share": self.dropped / max(1.0, float(load.sum()))}
        self.reset()
        return stats

    def close(self):
        for hook in self.hooks:
            hook.remove()


