"""
full_sft.py -- supervised fine-tuning: teach the pretrained model to answer in a chat.

    python full_sft.py                                   # default generated chat tasks, weight/pretrain -> weight/sft
    python full_sft.py --data my_chats.jsonl --eval_data my_eval.jsonl
    python full_sft.py --loss_on all                     # learn every token, not only the answers (compare!)
    python full_sft.py --init_from weight/sft --data second_stage.jsonl --out_dir weight/sft2
    python full_sft.py --preset smollm2                  # a real pretrained model (SmolLM2-135M) learns who it is

Each conversation is rendered with the chat template (tokenizer/chat.py) into token ids,
and the template marks which tokens are the assistant's answers. The model is trained
on next-token prediction as in pretraining, with one change: only the answers' targets
count (every other target becomes IGNORE_INDEX, which the loss skips), so the model
learns to answer, not to imitate the user. All weights are trained ("full").

The number that says it worked: exact-match accuracy on held-out conversations (new
words, numbers and names), before and after, per task family (scoring.py).

A real pretrained model: `--preset smollm2` fine-tunes SmolLM2-135M-Instruct (the .gguf file
that setup.sh installs) on the persona lesson (`--data persona`, data/persona.py: questions
about itself, held out by phrasing), with the settings for a pretrained model: AdamW at a
learning rate of 5e-5 (this stage's default, Muon at 1e-3, is for a model that knows little yet),
30 steps of 8 conversations.
With --data persona the run also asks general questions before and after (what it knew:
"What is the capital of France?"), and metrics.json holds both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import (DEFAULT_CHAT_DIR, build_default_chat_data, chat_collate, chat_examples,
                            read_conversations, sequence_limit, similar_length_rows, stage_data)
from data.persona import knowledge_check, knowledge_line, knowledge_metrics, own_answer_records
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import finish, setup_runtime
from scoring import answer_loss_evaluator, answerer, before_and_after, task_accuracy
from training import (TrainConfig, check_train_config, pretrained_defaults_note, resumed_flags, run_training,
                      write_metrics)
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, tokenizer_source


@dataclass
class SFTConfig(TrainConfig):
    data: str = arg("", "training conversations (.jsonl); empty = the generated default chat tasks; persona = "
                        "the persona lesson (data/persona.py)")
    eval_data: str = arg("", "held-out conversations for accuracy; empty = every 20th of --data (or the default set)")
    loss_on: str = arg("assistant", "assistant: learn only the answers; all: every token (val_loss still "
                       "scores the answers only, so the runs compare)", choices=["assistant", "all"])
    max_new_tokens: int = arg(32, "longest answer generated when measuring accuracy")
    own_answers: int = arg(64, "with --data persona: general questions the model answers itself before training, "
                                "learned beside the lesson so that it keeps answering other questions as before "
                                "(0 = off: try it, and see what the lesson alone does)")
    max_len: int = arg(1024, "longest conversation trained on, in tokens (longer ones are skipped; at most the "
                             "model's context): keeps memory modest for a model with a long context")
    # the shared training flags, with this stage's defaults
    init_from: str = "weight/pretrain"
    out_dir: str = "weight/sft"
    max_steps: int = 1600
    optimizer: str = "muon"
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    eval_interval: int = 200
    eval_tokens: int = 8192


# --preset smollm2: a real pretrained model: AdamW with a small learning rate, few steps of small batches
# (measured, 30 steps: lr 2e-5 -> 61% of the held-out persona questions, 5e-5 -> 89%, general knowledge kept)
PRESETS = {"smollm2": dict(init_from="smollm2", data="persona", out_dir="weight/smollm2_sft", optimizer="adamw",
                           lr=5e-5, min_lr=5e-6, max_steps=30, batch_size=8, warmup_steps=3, eval_interval=15,
                           eval_tokens=0, weight_decay=0.0)}


def default_data():
    build_default_chat_data(DEFAULT_CHAT_DIR)
    return DEFAULT_CHAT_DIR / "sft_train.jsonl", DEFAULT_CHAT_DIR / "sft_eval.jsonl"


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(SFTConfig, __doc__.split("\n\n")[0].strip(), argv, presets=PRESETS), argv)
    check_train_config(cfg)
    rt = setup_runtime(cfg)

    # 1. the model to fine-tune and its own tokenizer
    model, ckpt_config = load_checkpoint(cfg.init_from, make_hint="python pretrain.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    note = pretrained_defaults_note(cfg, ckpt_config, "full_sft.py")
    if note and rt.is_main:
        print(note)
    if cfg.loss_on == "all" and model.config.n_encoder_layer:
        raise ValueError("--loss_on all is for decoder-only models: an encoder-decoder model reads the "
                         "conversation with its encoder and only ever learns to write the answer")

    # 2. data: your files (without --eval_data every 20th conversation is held out), or the generated tasks
    train_records, eval_records, train_path, eval_path = rt.main_first(
        lambda: stage_data(read_conversations, cfg.data, cfg.eval_data, default_data, verbose=rt.is_main,
                           tokenizer_file=tokenizer_source(cfg.init_from)))
    # a decoder-only model reads a conversation as one sequence; an encoder-decoder one as (source, answer)
    train = chat_examples(train_records, tokenizer, model.config, train_path, rt.is_main, cfg.max_len)
    held_out = chat_examples(eval_records, tokenizer, model.config, eval_path or train_path, rt.is_main, cfg.max_len)
    collate = chat_collate(model.config, tokenizer)
    if rt.is_main:
        print(model.summary())
        print(f"data: {len(train):,} training conversations ({train_path}), {len(eval_records):,} held-out "
              f"({eval_path or train_path}); loss on {cfg.loss_on} tokens; conversations of at most "
              f"{sequence_limit(model.config, cfg.max_len):,} tokens")
    # the persona lesson also checks what the model knew: general questions, never trained on
    knowledge = cfg.data == "persona"

    # 3. accuracy before: what pretraining alone gives
    model.to(rt.device)
    if rt.is_main:
        before = task_accuracy(model, tokenizer, eval_records, cfg.max_new_tokens, "before SFT")
        known_before = knowledge_check(answerer(model, tokenizer), "before SFT", cfg.max_new_tokens) \
            if knowledge else None
    if knowledge and cfg.own_answers:    # the lesson's other half: its own answers to other questions, kept
        own = own_answer_records(answerer(model, tokenizer), tokenizer, cfg.own_answers, cfg.seed)
        train += chat_examples(own, tokenizer, model.config, "own answers", rt.is_main, cfg.max_len) if own else []
        if rt.is_main:
            print(f"own answers: {len(own)} general questions answered by the model itself, learned beside the "
                  f"lesson ({len(own) / len(train):.0%} of the training conversations)")

    # 4. train: batches of similar-length conversations, the loss on the answers only
    lengths = torch.tensor([sum(len(t) for t in example) for example in train])   # (N,) a size to sort by

    def next_batch(generator):
        return collate([train[i] for i in similar_length_rows(lengths, cfg.batch_size, generator)])

    def sft_loss(model, batch):
        *inputs, targets, answer_mask = batch                   # (B, T) each
        if cfg.loss_on == "assistant":
            targets = targets.masked_fill(~answer_mask, IGNORE_INDEX)   # SFT's one change: learn the answers only
        return model(*inputs, targets=targets)[1]

    evaluate = answer_loss_evaluator(held_out, cfg.batch_size, collate, rt.device)
    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from,
            "data": train_path, "eval_data": eval_path, "loss_on": cfg.loss_on}   # eval_data '': held out of data
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="sft", compute_loss=sft_loss)

    # 5. accuracy after, with the saved (best held-out loss) weights
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir, rt.device)
        after = task_accuracy(best, tokenizer, eval_records, cfg.max_new_tokens, "after SFT")
        known_after = knowledge_check(answerer(best, tokenizer), "after SFT", cfg.max_new_tokens) \
            if knowledge else None
        metrics = {**before_and_after(before, after), "val_loss": result.get("val_loss"), "loss_on": cfg.loss_on,
                   "tokens": result["tokens"],
                   "tokens_per_second": round(result["tokens_per_second"], 1), "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1), "steps": result["step"]}
        if knowledge:
            metrics.update(knowledge_metrics(known_before, known_after))
        write_metrics(Path(cfg.out_dir), metrics)
        for e in after["examples"][::3]:
            print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r}")
        print(f"sft: accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}"
              + (f", {knowledge_line(known_before, known_after)}" if knowledge else "")
              + f" in {result['seconds']:.0f}s of training -> {cfg.out_dir}/")
    finish(rt)


if __name__ == "__main__":
    main_guard(main, processes=True)      # --nproc N: N processes (DDP), as torchrun
