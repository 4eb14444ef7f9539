"""
verifier.py -- a reward model: one number for how good an answer is, learned from pairs of a better and a worse one.

    python verifier.py                          # weight/sft + its own sampled answers -> weight/verifier/
    python verifier.py --best_of 16             # then best-of-k for k = 1 ... 16 on the held-out tasks

The chat tasks have a checker, so here the pairs come for free: the SFT model answers each
training prompt several times (temperature 1), the checker marks the answers right or wrong,
and every (right, wrong) pair of answers to one prompt is a pair (chosen, rejected). They are
the model's own answers, the ones best-of-N will have to rank. On tasks no checker can score,
the pairs would come from people (or a stronger model) choosing, as for dpo.py's --data.

The network (scoring.RewardModel, beside the code that uses it at answer time: inference.py
--best_of, serve.py's best_of): the SFT transformer with a value head, one linear layer C -> 1,
read at the answer's last token (its <|im_end|>, which has seen the prompt and the whole answer):

    r(prompt, answer) = w . h_last + b
    loss = -log sigmoid(r(chosen) - r(rejected))            (Bradley-Terry)

so the model learns to score the chosen answer above the rejected one; held-out pair
accuracy (r(chosen) > r(rejected), on answers to held-out prompts) says how often it does.
After training it picks best-of-k on the held-out chat tasks: of k sampled answers, the one
it scores highest is the answer; beside it, the majority vote with each answer's vote weighed
by the verifier (sigmoid of its score: what inference.py and serve.py keep), the same samples'
plain vote (maj@k) and whether any of them is right (pass@k, the ceiling of any picker). A
verifier is also a reward for grpo.py where no checker can score (`python grpo.py --reward verifier`).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from atomic import atomic_path
from data.chat_data import DEFAULT_CHAT_DIR, build_default_chat_data, read_conversations, sft_data_of
from flags import arg, main_guard, parse_config
from runtime import finish, setup_runtime
from scoring import (HEAD_FILE, RewardModel, answer_ids, batch_of, is_right, load_verifier, mean_by_family, pick_best,
                     sampled_answers, scaling_report, score_answers)
from training import TrainConfig, check_train_config, resumed_flags, run_training, write_metrics
from weight.checkpoint import load_checkpoint_tokenizer, load_decoder_only, save_checkpoint

def own_answer_pairs(model, tokenizer, records: list[dict], samples: int, max_new_tokens: int, seed: int,
                     per_prompt: int = 2) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) pairs: the model's sampled answers to each prompt, a right one against a
    wrong one (at most per_prompt pairs per prompt; prompts answered all right or all wrong give none)."""
    rng = random.Random(seed)
    answers = sampled_answers(model, tokenizer, [r["conversations"] for r in records], samples, max_new_tokens,
                              temperature=1.0, seed=seed)
    pairs = []
    for record, group in zip(records, answers):
        right = sorted({a for a in group if is_right(a, record)})
        wrong = sorted({a for a in group if not is_right(a, record)})
        for _ in range(min(per_prompt, len(right) * len(wrong))):
            chosen, rejected = rng.choice(right), rng.choice(wrong)
            prompt = record["conversations"][:-1]
            pairs.append(tuple(answer_ids(prompt + [{"role": "assistant", "content": a}], tokenizer)
                               for a in (chosen, rejected)))
    return [p for p in pairs if max(len(p[0]), len(p[1])) <= model.config.block_size]


def save_verifier(out_dir: Path, reward_model: RewardModel, meta: dict, tokenizer=None):
    """The backbone as a checkpoint folder (model.pt, config.json, tokenizer.json) and the value head beside it."""
    save_checkpoint(out_dir, reward_model.backbone, meta, tokenizer)
    with atomic_path(Path(out_dir) / HEAD_FILE) as tmp:
        torch.save(reward_model.value_head.state_dict(), tmp)


def pair_accuracy(reward_model, pairs, pad_id: int, device, batch_size: int = 64) -> tuple[float, float]:
    """(Bradley-Terry loss, share of pairs scored chosen > rejected) over pairs; a tie counts half, as a
    coin flip would pick (an untrained verifier, scoring every answer 0, is at chance: 50%)."""
    losses, right = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            chosen = reward_model(*batch_of([c for c, _ in chunk], pad_id, device))
            rejected = reward_model(*batch_of([r for _, r in chunk], pad_id, device))
            losses.append(-F.logsigmoid(chosen - rejected))
            right.append((chosen > rejected).float() + 0.5 * (chosen == rejected).float())
    return torch.cat(losses).mean().item(), torch.cat(right).mean().item()


def best_of_k(reward_model, policy, tokenizer, records: list[dict], n: int, max_new_tokens: int, seed: int = 0,
              orders: int = 16) -> dict:
    """n answers per held-out record sampled from the policy (the model whose answers are picked: the SFT
    model, not the verifier's own backbone, which training changed); for k = 1, 2, 4, ... n: best-of-k (the
    verifier's top-scored of k samples is right), the vote weighted by the verifier (scoring.pick_best, what
    inference.py and serve.py keep), maj@k and pass@k on the same samples, each averaged over `orders`
    random draws of k."""
    samples = sampled_answers(policy, tokenizer, [r["conversations"] for r in records], n, max_new_tokens,
                              temperature=1.0, seed=seed)
    scores = [score_answers(reward_model, tokenizer, r["conversations"][:-1], answers) for r, answers in zip(records, samples)]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    rng = random.Random(seed)
    best, weighted = {k: [] for k in ks}, {k: [] for k in ks}         # per record: the share of draws right
    for record, answers, score in zip(records, samples, scores):
        for k in ks:
            best_right = weighted_right = 0
            for _ in range(orders):
                drawn = rng.sample(range(n), k)
                best_right += is_right(answers[max(drawn, key=lambda i: score[i])], record)
                kept, _ = pick_best([answers[i] for i in drawn], [score[i] for i in drawn])
                weighted_right += is_right(answers[drawn[kept]], record)
            best[k].append(best_right / orders)
            weighted[k].append(weighted_right / orders)
    report = scaling_report(records, samples, ks, orders, seed)
    best_by_family = {k: mean_by_family(best[k], [r.get("family", "user") for r in records]) for k in ks}
    best, weighted = ({k: sum(v[k]) / len(records) for k in ks} for v in (best, weighted))
    print("held-out tasks, k sampled answers (temperature 1):")
    for k in ks:
        print(f"  k={k:<3} best-of-k (verifier) {best[k]:6.1%}   vote weighted by it {weighted[k]:6.1%}   "
              f"maj@k {report['maj_at_k'][k]:6.1%}   pass@k {report['pass_at_k'][k]:6.1%}")
    return {"ks": ks, "best_of_k": best, "weighted_vote_at_k": weighted, "maj_at_k": report["maj_at_k"],
            "pass_at_k": report["pass_at_k"], "best_of_k_by_family": best_by_family,
            "maj_at_k_by_family": report["maj_at_k_by_family"]}


@dataclass
class VerifierConfig(TrainConfig):
    samples: int = arg(8, "answers sampled per prompt to make pairs")
    prompts: int = arg(1200, "training prompts answered (each gives up to 2 pairs)")
    eval_prompts: int = arg(400, "held-out prompts answered for the held-out pairs")
    max_new_tokens: int = arg(0, "longest sampled answer (0 = the SFT model's own, from its config.json: 64 for "
                                 "worked answers; else 32)")
    best_of: int = arg(8, "after training: best-of-k on the held-out tasks for k = 1, 2, 4, ... this (0 = skip)")
    # the shared training flags, with this stage's defaults
    init_from: str = "weight/sft"
    out_dir: str = "weight/verifier"
    max_steps: int = 150
    batch_size: int = 16             # pairs per step
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    eval_interval: int = 50


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(VerifierConfig, __doc__.split("\n\n")[0].strip(), argv), argv)
    check_train_config(cfg)
    rt = setup_runtime(cfg)
    backbone, ckpt_config = load_decoder_only(cfg.init_from, rt.device, "verifier.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    if not cfg.max_new_tokens:      # as long as the SFT model's answers were allowed to be when it was measured
        cfg.max_new_tokens = int((ckpt_config.get("train") or {}).get("max_new_tokens") or 32)

    # 1. pairs: the SFT model's own answers, right against wrong (held-out pairs from held-out prompts), to
    # the prompts it was fine-tuned on (worked answers for weight/sft_cot), else the default chat tasks'
    own_train, own_eval, _ = sft_data_of(ckpt_config) if ckpt_config.get("stage") == "sft" else ([], [], "")
    if not own_train:
        build_default_chat_data(DEFAULT_CHAT_DIR, verbose=rt.is_main)
        own_train = list(read_conversations(DEFAULT_CHAT_DIR / "sft_train.jsonl"))
        own_eval = list(read_conversations(DEFAULT_CHAT_DIR / "sft_eval.jsonl"))
    train_records = random.Random(cfg.seed).sample(own_train, min(cfg.prompts, len(own_train)))
    eval_records = own_eval[:cfg.eval_prompts]
    backbone.eval()
    train = own_answer_pairs(backbone, tokenizer, train_records, cfg.samples, cfg.max_new_tokens, cfg.seed)
    held_out = own_answer_pairs(backbone, tokenizer, eval_records, cfg.samples, cfg.max_new_tokens, cfg.seed + 1)
    if not train or not held_out:
        raise ValueError(f"{cfg.init_from}: its sampled answers are all right or all wrong, so there is no "
                         f"(right, wrong) pair to learn from; start from a model that is right part of the time")
    if rt.is_main:
        print(f"verifier: {len(train):,} training pairs from {len(train_records):,} prompts x {cfg.samples} samples, "
              f"{len(held_out):,} held-out pairs")

    # 2. train: Bradley-Terry on batches of pairs
    reward_model = RewardModel(copy.deepcopy(backbone)).to(rt.device)   # backbone stays the policy, untrained
    pad_id = tokenizer.eot_id

    def next_batch(generator):
        rows = torch.randint(len(train), (cfg.batch_size,), generator=generator).tolist()
        chosen, chosen_last = batch_of([train[i][0] for i in rows], pad_id, "cpu")
        rejected, rejected_last = batch_of([train[i][1] for i in rows], pad_id, "cpu")
        return chosen, chosen_last, rejected, rejected_last

    def compute_loss(model, batch):
        chosen, chosen_last, rejected, rejected_last = batch
        return -F.logsigmoid(model(chosen, chosen_last) - model(rejected, rejected_last)).mean()

    def evaluate(model, max_tokens):
        loss, accuracy = pair_accuracy(model, held_out, pad_id, rt.device)
        return {"val_loss": loss, "pair_accuracy": accuracy}

    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from}
    reward_model.train()
    result = run_training(reward_model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="verifier",
                          compute_loss=compute_loss, save_weights=save_verifier)

    # 3. the kept verifier on the held-out pairs
    if rt.is_main:
        best, _ = load_verifier(cfg.out_dir, rt.device)
        loss, accuracy = pair_accuracy(best, held_out, pad_id, rt.device)
        metrics = {"pair_accuracy": accuracy, "val_loss": loss, "pairs": len(train), "held_out_pairs": len(held_out),
                   "steps": result["step"], "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1)}
        if cfg.best_of:
            metrics["best_of"] = best_of_k(best, backbone, tokenizer, eval_records, cfg.best_of, cfg.max_new_tokens,
                                           cfg.seed)
        write_metrics(Path(cfg.out_dir), metrics)
        print(f"verifier: held-out pair accuracy {accuracy:.1%} ({len(held_out)} pairs of the model's own right and "
              f"wrong answers) -> {cfg.out_dir}/")
    finish(rt)


if __name__ == "__main__":
    main_guard(main)
