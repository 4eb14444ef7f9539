"""
lora.py -- teach the chat model a new skill by training small low-rank adapters.

    python lora.py                                  # weight/sft + the "first word" skill -> weight/lora/
    python lora.py --rank 8 --alpha 16 --target_modules q_proj v_proj
    python lora.py --data my_skill.jsonl --eval_data my_skill_eval.jsonl --out_dir weight/lora_my_skill
    python lora.py --merge                          # weight/lora adapter folded into weight/lora_merged/

LoRA (Hu et al., 2021): every chosen linear layer W (out, in) stays frozen and gets a
trainable update B A, with A (r, in) and B (out, r) for a small rank r:

    y = W x + (alpha / r) * B A x          B = 0 at the start, so nothing changes until it learns

Only A and B are trained and saved (adapter.pt, a few % of the model). `--merge` folds
B A into W and writes a full checkpoint that computes the same as base + adapter.

The numbers that say it worked: the new skill's held-out accuracy before and after,
and the old skills' accuracy next to the SFT model's (how much was forgotten).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import (DEFAULT_CHAT_DIR, NEW_SKILL, chat_collate, chat_examples, default_words,
                            generate_chat_data, read_conversations, records_and_held_out, sft_data_of,
                            similar_length_rows, write_jsonl)
from evaluation import answer_loss_evaluator, exact_match_report, format_report
from model import add_lora, lora_state_dict, merge_lora
from training import (ADAPTER_CONFIG, ADAPTER_FILE, WEIGHTS_FILE, TrainConfig, adapter_base, arg, atomic_save,
                      atomic_write_text, check_train_config, load_adapted_model, load_checkpoint,
                      load_checkpoint_tokenizer, main_guard, parse_config, run_training, save_checkpoint,
                      setup_runtime, weights_checksum, write_metrics)


@dataclass
class LoRAConfig(TrainConfig):
    data: str = arg("", "training conversations for the new skill (.jsonl); empty = the generated 'first word' skill")
    eval_data: str = arg("", "held-out conversations of the new skill; empty = every 20th of --data (or the "
                             "default ones)")
    old_eval_data: str = arg("", "held-out conversations of the old skills (forgetting check); empty = the "
                                 "base's SFT held-out set")
    replay_data: str = arg("", "old skills' conversations to replay (--replay); empty = the base's SFT data")
    init_from: str = arg("weight/sft", "the model to adapt (its weights stay frozen)")
    out_dir: str = arg("weight/lora", "output folder: adapter.pt + adapter_config.json")
    lora_name: str = arg("first_word", "a name for the adapter, stored in adapter_config.json")
    rank: int = arg(8, "r: rank of the update B A")
    alpha: float = arg(16.0, "scaling: the update is multiplied by alpha / r")
    target_modules: tuple = arg(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                "linear layers (by name ending) that get an adapter", nargs="+", type=str)
    replay: float = arg(0.2, "share of each batch drawn from the old skills' training data (limits forgetting)")
    merge: bool = arg(False, "fold the adapter in out_dir into its base and write a full checkpoint")
    merged_dir: str = arg("", "where --merge writes ('' = out_dir + '_merged')")
    force: bool = arg(False, "let --merge replace an existing folder")
    epochs: float = arg(0.0, "passes over the training data (0 = use max_steps / time_budget)")
    optimizer: str = arg("adamw", "adamw only: Muon orthogonalizes full weight matrices, not low-rank factors",
                         choices=["adamw"])
    lr: float = arg(3e-3, "peak learning rate")
    min_lr: float = arg(3e-4, "final learning rate")
    batch_size: int = arg(32, "conversations per micro-batch")
    max_steps: int = arg(1000, "optimizer steps (at most)")
    time_budget: float = arg(90.0, "seconds of training steps (0 = exactly max_steps)")
    warmup_steps: int = arg(10, "linear warmup steps")
    eval_interval: int = arg(100, "evaluate the held-out loss every N steps")
    eval_tokens: int = arg(8192, "held-out tokens scored in periodic evaluations")
    max_new_tokens: int = arg(32, "longest answer generated when measuring accuracy")


def save_adapter(out_dir: Path, model, meta: dict, tokenizer=None):
    """Only the LoRA tensors, and what they belong to (run_training calls this for the best weights)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(lora_state_dict(model), out_dir / ADAPTER_FILE)
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(meta, indent=2, default=str))


def default_skill_data(out_dir: Path = DEFAULT_CHAT_DIR) -> dict[str, Path]:
    """The new skill ("which word comes first?"), never in the SFT data, with held-out words."""
    paths = {"train": out_dir / f"lora_{NEW_SKILL}_train.jsonl", "eval": out_dir / f"lora_{NEW_SKILL}_eval.jsonl"}
    if not all(p.exists() for p in paths.values()):
        train, held_out = generate_chat_data(default_words(), 5000, 50, seed=1, families=(NEW_SKILL,))
        write_jsonl(paths["eval"], held_out)
        write_jsonl(paths["train"], train)
    return paths


def merge_command(cfg: LoRAConfig):
    out = Path(cfg.merged_dir or cfg.out_dir.rstrip("/") + "_merged")
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise ValueError(f"{out}/ already exists: add --force to replace it, or choose --merged_dir")
    model, config = load_adapted_model(cfg.out_dir)
    merge_lora(model)
    tokenizer = load_checkpoint_tokenizer(adapter_base(config))
    save_checkpoint(out, model, {"tokenizer": config["tokenizer"], "stage": "lora_merged",
                                 "lora": config["lora"], "init_from": config["init_from"]}, tokenizer)
    print(f"lora: merged {cfg.out_dir}/ into {config['init_from']}/ -> {out}/ (a full checkpoint)")


def main(argv=None):
    started = time.time()
    cfg = parse_config(LoRAConfig, __doc__.split("\n\n")[0].strip(), argv)
    if cfg.merge:
        return merge_command(cfg)
    check_train_config(cfg)
    rt = setup_runtime(cfg)

    # 1. the frozen base and its tokenizer
    model, base_config = load_checkpoint(cfg.init_from, make_hint="python full_sft.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    base_model_config, base_checksum = model.config.to_dict(), weights_checksum(model)

    # 2. data: the new skill, plus a replay of old skills, plus held-out sets for both
    if cfg.eval_data and not cfg.data:
        raise ValueError("--eval_data needs --data (the new skill's training conversations) too")
    if cfg.data:         # your skill; without --eval_data every 20th conversation is held out
        train_path, eval_path = Path(cfg.data), cfg.eval_data
    else:
        skill = default_skill_data()
        train_path, eval_path = skill["train"], skill["eval"]
    new_records, eval_records = records_and_held_out(read_conversations, train_path, eval_path)
    # the old skills: what the base was fine-tuned on (its config.json names the files), unless given
    old_train_records, old_eval_records, old_where = sft_data_of(base_config)
    if cfg.replay_data:
        old_train_records, old_where = list(read_conversations(cfg.replay_data)), cfg.replay_data
    if cfg.old_eval_data:
        old_eval_records = list(read_conversations(cfg.old_eval_data))
    new = chat_examples(new_records, tokenizer, model.config, "assistant", str(train_path))
    old = chat_examples(old_train_records, tokenizer, model.config, "assistant", old_where) if cfg.replay > 0 else []
    held_out = chat_examples(eval_records, tokenizer, model.config, "assistant", str(eval_path or train_path))
    if cfg.replay > 0:
        print(f"replay: {cfg.replay:.0%} of each batch from {len(old):,} conversations of {old_where}" if old else
              "replay: off (no SFT data of the base found; --replay_data names the old skills' training data)")
    collate = chat_collate(model.config, tokenizer)

    # 3. before: the base model on the new skill and on the old ones
    model.to(rt.device)
    new_before = exact_match_report(model, tokenizer, eval_records, cfg.max_new_tokens)
    old_before = exact_match_report(model, tokenizer, old_eval_records, cfg.max_new_tokens) if old_eval_records else None
    print(f"before LoRA, new skill: {format_report(new_before)}")
    if old_before:
        print(f"before LoRA, old skills: {format_report(old_before)}")

    # 4. adapters: freeze everything, add trainable A and B beside the chosen layers
    wrapped = add_lora(model, list(cfg.target_modules), cfg.rank, cfg.alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"lora: rank {cfg.rank}, alpha {cfg.alpha}, {len(wrapped)} layers, {trainable:,} trainable of "
          f"{total:,} parameters ({trainable / total:.2%})")
    if cfg.epochs > 0:               # a batch holds about (1 - replay) x batch_size new-skill rows
        new_per_batch = cfg.batch_size * (1 - cfg.replay) if old else cfg.batch_size
        cfg.max_steps, cfg.time_budget = max(1, round(cfg.epochs * len(new) / new_per_batch)), 0.0

    new_lengths, old_lengths = (torch.tensor([sum(len(t) for t in e) for e in examples]) for examples in (new, old))

    def next_batch(generator):
        n_old = int((torch.rand(cfg.batch_size, generator=generator) < cfg.replay).sum()) if old else 0
        rows = [new[i] for i in similar_length_rows(new_lengths, cfg.batch_size - n_old, generator)]
        rows += [old[i] for i in similar_length_rows(old_lengths, n_old, generator)] if n_old else []
        return collate(rows)

    evaluate = answer_loss_evaluator(held_out, cfg.batch_size, collate, rt.device)
    meta = {"tokenizer": base_config.get("tokenizer"), "init_from": cfg.init_from, "base_model": base_model_config,
            "base_checksum": base_checksum,
            "lora": {"name": cfg.lora_name, "rank": cfg.rank, "alpha": cfg.alpha,
                     "target_modules": list(cfg.target_modules)}, "data": str(train_path)}
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="lora",
                          save_weights=save_adapter)

    # 5. after: base + the best adapter, reloaded from disk as a user would
    best, _ = load_adapted_model(cfg.out_dir, rt.device)
    new_after = exact_match_report(best, tokenizer, eval_records, cfg.max_new_tokens)
    old_after = exact_match_report(best, tokenizer, old_eval_records, cfg.max_new_tokens) if old_eval_records else None
    adapter_bytes = (Path(cfg.out_dir) / ADAPTER_FILE).stat().st_size
    base = Path(cfg.init_from)       # our model.pt, or a Hugging Face folder's safetensors
    model_bytes = sum(f.stat().st_size for f in [base / WEIGHTS_FILE] + list(base.glob("*.safetensors")) if f.exists())
    metrics = {"new_skill_accuracy": new_after["accuracy"], "new_skill_accuracy_before": new_before["accuracy"],
               "old_skills_accuracy": old_after["accuracy"] if old_after else None,
               "old_skills_accuracy_before": old_before["accuracy"] if old_before else None,
               "accuracy": (old_after or new_after)["accuracy"],   # the old skills: SFT's held-out set, comparable
               "accuracy_by_family": {**(old_after or {}).get("accuracy_by_family", {}),
                                      **new_after["accuracy_by_family"]},
               "trainable_params": trainable, "trainable_fraction": trainable / total,
               "adapter_bytes": adapter_bytes, "adapter_fraction": adapter_bytes / model_bytes,
               "tokens": result["tokens"], "seconds": round(result["seconds"], 1),
               "wall_seconds": round(time.time() - started, 1), "steps": result["step"]}
    write_metrics(Path(cfg.out_dir), metrics)
    print(f"after LoRA, new skill: {format_report(new_after)}")
    if old_after:
        print(f"after LoRA, old skills: {format_report(old_after)}")
    print(f"lora: new skill {new_before['accuracy']:.1%} -> {new_after['accuracy']:.1%}"
          + (f", old skills {old_before['accuracy']:.1%} -> {old_after['accuracy']:.1%}" if old_after else "")
          + f"; adapter {adapter_bytes / 1e3:.0f} kB ({adapter_bytes / model_bytes:.1%} of the model) -> {cfg.out_dir}/")


if __name__ == "__main__":
    main_guard(main)
