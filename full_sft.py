"""
full_sft.py -- supervised fine-tuning: teach the pretrained model to answer in a chat.

    python full_sft.py                                   # default generated chat tasks, weight/pretrain -> weight/sft
    python full_sft.py --data my_chats.jsonl --eval_data my_eval.jsonl
    python full_sft.py --loss_on all                     # learn every token, not only the answers (compare!)
    python full_sft.py --init_from weight/sft --data second_stage.jsonl --out_dir weight/sft2

Each conversation is rendered with the chat template (tokenizer/chat.py) into token ids
and a loss mask. The model is trained on next-token prediction as in pretraining, but
the loss only counts the assistant's tokens: targets elsewhere are -100 (ignored), so
the model learns to answer, not to imitate the user. All weights are trained ("full").

The number that says it worked: exact-match accuracy on held-out conversations (new
words, numbers and names), before and after, per task family (evaluation.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import (DEFAULT_CHAT_DIR, build_default_chat_data, chat_collate, chat_examples, read_conversations,
                            records_and_held_out, similar_length_rows)
from evaluation import answer_loss_evaluator, exact_match_report, format_report
from training import (TrainConfig, arg, check_train_config, load_checkpoint, load_checkpoint_tokenizer,
                      main_guard, parse_config, run_training, setup_runtime, write_metrics)


@dataclass
class SFTConfig(TrainConfig):
    data: str = arg("", "training conversations (.jsonl); empty = the generated default chat tasks")
    eval_data: str = arg("", "held-out conversations for accuracy; empty = every 20th of --data (or the default set)")
    loss_on: str = arg("assistant", "assistant: learn only the answers; all: every token (val_loss still "
                       "scores the answers only, so the runs compare)", choices=["assistant", "all"])
    init_from: str = arg("weight/pretrain", "checkpoint to fine-tune (made by pretrain.py)")
    out_dir: str = arg("weight/sft", "output folder")
    max_steps: int = arg(2000, "optimizer steps (at most: the time budget usually ends the run first)")
    time_budget: float = arg(240.0, "seconds of training steps (0 = exactly max_steps)")
    optimizer: str = arg("muon", "muon (Muon for the blocks' matrices, AdamW for the rest) or adamw",
                         choices=["adamw", "muon"])
    batch_size: int = arg(32, "conversations per micro-batch")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr: float = arg(1e-4, "final learning rate")
    warmup_steps: int = arg(20, "linear warmup steps")
    eval_interval: int = arg(100, "evaluate the held-out loss and checkpoint every N steps")
    eval_tokens: int = arg(8192, "held-out tokens scored in periodic evaluations")
    max_new_tokens: int = arg(32, "longest answer generated when measuring accuracy")


def main(argv=None):
    started = time.time()
    cfg = parse_config(SFTConfig, __doc__.split("\n\n")[0].strip(), argv)
    check_train_config(cfg)
    rt = setup_runtime(cfg)

    # 1. the model to fine-tune and its own tokenizer
    model, ckpt_config = load_checkpoint(cfg.init_from, make_hint="python pretrain.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)

    # 2. data: the default generated tasks unless files are given
    if cfg.eval_data and not cfg.data:
        raise ValueError("--eval_data needs --data (the training conversations) too")
    if cfg.data:         # your files; without --eval_data every 20th conversation is held out
        train_path, eval_path = Path(cfg.data), cfg.eval_data
    else:
        if rt.is_main:
            build_default_chat_data(DEFAULT_CHAT_DIR)
        if rt.distributed:
            torch.distributed.barrier()
        train_path, eval_path = DEFAULT_CHAT_DIR / "sft_train.jsonl", DEFAULT_CHAT_DIR / "sft_eval.jsonl"
    train_records, eval_records = records_and_held_out(read_conversations, train_path, eval_path)
    # a decoder-only model reads a conversation as one sequence; an encoder-decoder one as (source, answer)
    train = chat_examples(train_records, tokenizer, model.config, cfg.loss_on, str(train_path))
    held_out = chat_examples(eval_records, tokenizer, model.config, "assistant", str(eval_path or train_path))
    collate = chat_collate(model.config, tokenizer)
    if rt.is_main:
        print(model.summary())
        print(f"data: {len(train):,} training conversations ({train_path}), {len(eval_records):,} held-out "
              f"({eval_path or train_path}); loss on {cfg.loss_on} tokens")

    # 3. accuracy before: what pretraining alone gives
    model.to(rt.device)
    if rt.is_main:
        before = exact_match_report(model, tokenizer, eval_records, cfg.max_new_tokens)
        print(f"before SFT: {format_report(before)}")

    # 4. train
    lengths = torch.tensor([sum(len(t) for t in example) for example in train])     # (N,) a size to sort by

    def next_batch(generator):
        rows = similar_length_rows(lengths, cfg.batch_size, generator)   # random rows, little padding
        return collate([train[i] for i in rows])

    evaluate = answer_loss_evaluator(held_out, cfg.batch_size, collate, rt.device)
    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from,
            "data": str(train_path), "eval_data": str(eval_path), "loss_on": cfg.loss_on}   # '': held out of data
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="sft")

    # 5. accuracy after, with the saved (best held-out loss) weights
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir, rt.device)
        after = exact_match_report(best, tokenizer, eval_records, cfg.max_new_tokens)
        metrics = {"accuracy": after["accuracy"], "accuracy_by_family": after["accuracy_by_family"],
                   "accuracy_before": before["accuracy"], "accuracy_by_family_before": before["accuracy_by_family"],
                   "val_loss": result.get("val_loss"), "loss_on": cfg.loss_on, "examples": after["examples"],
                   "tokens": result["tokens"], "tokens_per_second": round(result["tokens_per_second"], 1),
                   "seconds": round(result["seconds"], 1), "wall_seconds": round(time.time() - started, 1),
                   "steps": result["step"]}
        write_metrics(Path(cfg.out_dir), metrics)
        print(f"after SFT:  {format_report(after)}")
        for e in after["examples"][::3]:
            print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r}")
        print(f"sft: accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} in {result['seconds']:.0f}s "
              f"of training -> {cfg.out_dir}/")
    if rt.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
