"""
distill.py -- knowledge distillation: a student learns from a teacher's answers, not only from the data's.

    python distill.py                                   # teacher weight/sft, student weight/pretrain -> weight/distill/
    python distill.py --alpha 0.5 --temperature 2     # more weight on the data, softer targets (measured: worse)
    python distill.py --mode sequence                   # the teacher's own answers as the data

Token level (--mode token, Hinton et al., 2015), when teacher and student share a tokenizer:
at every answer token the teacher's whole next-token distribution is a target, softened by a
temperature T, beside the data's one right token:

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL( softmax(teacher / T) || softmax(student / T) )

The teacher says how likely every other token was ("1" after "4" is almost as good as "5",
"zebra" is not), which one right token cannot; T^2 keeps the gradient of the soft part at
the size of the hard one's as T grows.

Sequence level (--mode sequence, Kim and Rush, 2016), which works across tokenizers: the
teacher answers the training prompts greedily and the student is fine-tuned on those answers,
as full_sft.py would on data.

The default run: teacher the SFT model (1,600 steps), student the pretrained model with a
budget of 600 steps, the same as `python full_sft.py --max_steps 600`; both report
accuracy per family on the same held-out set, so the two compare at equal budget. Measured
(docs/reasoning.md): alpha 0.1, T 1 (the defaults) beat the data alone in both seeds tried,
39.0% vs 37.5% and 39.8% vs 36.2%; alpha 0.5 with T 2 did not (36.8%, and 32.0% at alpha 0.1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.chat_data import (DEFAULT_CHAT_DIR, build_default_chat_data, chat_collate, chat_examples,
                            read_conversations, similar_length_rows)
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import finish, setup_runtime
from scoring import answer_loss_evaluator, before_and_after, greedy_answers, task_accuracy
from training import TrainConfig, check_train_config, resumed_flags, run_training, write_metrics
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_decoder_only, same_tokens


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = arg("weight/sft", "the teacher checkpoint")
    mode: str = arg("token", "token: match the teacher's distribution (same tokenizer); sequence: learn the "
                             "teacher's greedy answers", choices=["token", "sequence"])
    alpha: float = arg(0.1, "token mode: weight of the data's own answer (1 = plain SFT, 0 = the teacher only)")
    temperature: float = arg(1.0, "token mode: softens both distributions before they are compared")
    max_new_tokens: int = arg(32, "longest answer generated (the teacher's, in sequence mode; accuracy)")
    # the shared training flags, with this stage's defaults (full_sft.py's, with its budget set by max_steps)
    init_from: str = "weight/pretrain"
    out_dir: str = "weight/distill"
    max_steps: int = 600
    optimizer: str = "muon"
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    eval_interval: int = 200
    eval_tokens: int = 8192


def distill_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float):
    """student_logits, teacher_logits (N, V) at the N answer positions, targets (N,):
    alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), each averaged over positions."""
    hard = F.cross_entropy(student_logits, targets)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1), log_target=True, reduction="batchmean")
    return alpha * hard + (1 - alpha) * temperature ** 2 * soft


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(DistillConfig, __doc__.split("\n\n")[0].strip(), argv), argv)
    check_train_config(cfg)
    if not 0 <= cfg.alpha <= 1 or cfg.temperature <= 0:
        raise ValueError(f"--alpha {cfg.alpha} --temperature {cfg.temperature}: alpha goes from 0 to 1 and the "
                         f"temperature must be above 0")
    rt = setup_runtime(cfg)

    # 1. student and teacher; token-level distillation compares distributions over the same vocabulary
    student, ckpt_config = load_decoder_only(cfg.init_from, rt.device, "distill.py", make_hint="python pretrain.py")
    teacher, _ = load_decoder_only(cfg.teacher, rt.device, "distill.py")
    teacher.eval().requires_grad_(False)
    tokenizer, teacher_tokenizer = load_checkpoint_tokenizer(cfg.init_from), load_checkpoint_tokenizer(cfg.teacher)
    same_vocabulary = same_tokens(teacher_tokenizer, tokenizer) and teacher.config.vocab_size == student.config.vocab_size
    if cfg.mode == "token" and not same_vocabulary:
        raise ValueError(f"{cfg.teacher} and {cfg.init_from} have different tokenizers: token-level distillation "
                         f"compares distributions over one vocabulary; use --mode sequence")

    # 2. data: the chat tasks; in sequence mode the answers are the teacher's own
    build_default_chat_data(DEFAULT_CHAT_DIR, verbose=rt.is_main)
    train_records = list(read_conversations(DEFAULT_CHAT_DIR / "sft_train.jsonl"))
    eval_records = list(read_conversations(DEFAULT_CHAT_DIR / "sft_eval.jsonl"))
    if cfg.mode == "sequence":
        answers = greedy_answers(teacher, teacher_tokenizer,
                                 [r["conversations"] for r in train_records], cfg.max_new_tokens)
        train_records = [{**r, "conversations": r["conversations"][:-1] + [{"role": "assistant", "content": a}]}
                         for r, a in zip(train_records, answers) if a]
        if not train_records:
            raise ValueError(f"{cfg.teacher} answered no training prompt (every answer empty): a teacher must "
                             f"answer something; check it with python evaluation.py --ckpt {cfg.teacher}")
        if rt.is_main:
            print(f"distill: the teacher answered {len(train_records):,} training prompts; the student learns those")
    train = chat_examples(train_records, tokenizer, student.config, "training data", rt.is_main)
    held_out = chat_examples(eval_records, tokenizer, student.config, "held-out data", rt.is_main)
    collate = chat_collate(student.config, tokenizer)
    if rt.is_main:
        before = task_accuracy(student, tokenizer, eval_records, cfg.max_new_tokens, "student before")

    # 3. train: the answers' tokens, against the data (and the teacher's distribution in token mode)
    lengths = torch.tensor([sum(len(t) for t in example) for example in train])

    def next_batch(generator):
        return collate([train[i] for i in similar_length_rows(lengths, cfg.batch_size, generator)])

    def compute_loss(model, batch):
        x, targets, answer_mask = batch                                       # (B, T) each
        targets = targets.masked_fill(~answer_mask, IGNORE_INDEX)
        if cfg.mode == "sequence":
            return model(x, targets=targets)[1]
        scored = targets != IGNORE_INDEX                                      # (B, T)
        with torch.no_grad():
            teacher_logits = teacher(x)[0][scored].float()                    # (N, V)
        return distill_loss(model(x)[0][scored].float(), teacher_logits, targets[scored], cfg.alpha, cfg.temperature)

    evaluate = answer_loss_evaluator(held_out, cfg.batch_size, collate, rt.device)
    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from, "teacher": cfg.teacher,
            "mode": cfg.mode}
    # saved as stage "sft": a chat model, which inference.py and evaluation.py prompt with the template
    result = run_training(student, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="sft",
                          compute_loss=compute_loss)

    # 4. after: the student beside its teacher, on the same held-out set
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir, rt.device)
        after = task_accuracy(best, tokenizer, eval_records, cfg.max_new_tokens, "student after")
        metrics = {**before_and_after(before, after), "mode": cfg.mode, "teacher": cfg.teacher, "alpha": cfg.alpha,
                   "temperature": cfg.temperature, "steps": result["step"], "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1)}
        write_metrics(Path(cfg.out_dir), metrics)
        print(f"distill ({cfg.mode}): student accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} in "
              f"{result['seconds']:.0f}s of training -> {cfg.out_dir}/")
    finish(rt)


if __name__ == "__main__":
    main_guard(main)
