"""
grpo.py -- reinforcement learning with verifiable rewards: sample answers, check them, reinforce the right ones.

    python grpo.py                                # weight/sft_cot + its own training prompts -> weight/grpo/
    python grpo.py --init_from weight/sft         # from the model that answers directly (full_sft.py's default)
    python grpo.py --group_size 16 --kl_coef 0.02 --families reverse upper
    python grpo.py --updates 2                    # two gradient steps on each batch of samples (clipping at work)

SFT shows the model right answers; here the model writes its own and learns from how they
score. The chat tasks can be checked exactly (the held-out scores of full_sft.py are exact
match), so the reward needs no reward model: 1 when the answer is right, else 0. (For tasks
no checker can score, `--reward verifier` takes verifier.py's learned score of each answer.)

It starts from the model that works its answers out (`python full_sft.py --data cot --max_new_tokens
64 --out_dir weight/sft_cot`, data/cot.py) and practises on that model's own training prompts,
scored on its held-out set. There GRPO has something to work with: the worked answers are
right often enough that a group of samples holds right and wrong ones, and the measured gain is
larger than luck (docs/reasoning.md). From the model that answers directly, most groups were all
wrong or all right, and the gain stayed within the noise.

GRPO (Shao et al., 2024, DeepSeekMath), step by step, for a batch of prompts:
1. Sample a group of G answers to each prompt from the current model (the KV-cache
   engine) at a temperature below 1: a small model's distribution has a long tail of
   nonsense that full-temperature samples keep hitting. The policy being trained is that
   tempered distribution, pi = softmax(logits / T): the log-probs below use it too.
2. Reward each answer r_i with the checker.
3. Group-relative advantage: A_i = (r_i - mean(r)) / (std(r) + 1e-4) within its group. The
   group is its own baseline, so no value network is needed. A group whose answers all
   score the same (all right, all wrong) teaches nothing (every A_i = 0) and is dropped
   before the backward pass.
4. Per answer token t, with ratio = pi(t) / pi_old(t) (pi_old: the model that sampled):
       loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL_t
       KL_t   = exp(ref_t - pi_t) - (ref_t - pi_t) - 1        (log-probs; always >= 0)
   KL_t keeps the policy near the frozen SFT model (ref). The loss is averaged over each
   answer's tokens, then over answers. With --updates 1 (the default) ratio is 1 and its
   gradient is A * grad log pi: plain policy gradient with a group baseline; with more
   updates per batch the clip stops an answer's probability from moving more than eps.

The numbers that say it worked: held-out exact match per task family before and after
(the same held-out set full_sft.py reports), and the curves in weight/grpo/grpo.png: mean
reward, held-out accuracy, KL to the SFT model and answer length.
"""

from __future__ import annotations

import copy
import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat_data import DEFAULT_CHAT_DIR, build_default_chat_data, collate, read_conversations, sft_data_of
from data.cot import COT_FAMILIES, MARKERS
from engine import generate, left_pad
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import finish, setup_runtime
from scoring import before_and_after, change_line, exact_match_report, format_report, is_right, load_verifier, score_answers
from tokenizer.chat import render_chat
from training import TrainConfig, check_train_config, resumed_flags, run_training, write_metrics
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_decoder_only, same_tokens


@dataclass
class GRPOConfig(TrainConfig):
    data: str = arg("", "prompts with checkable answers (.jsonl chat records); empty = the training set the "
                        "--init_from model was fine-tuned on")
    eval_data: str = arg("", "held-out records for accuracy; empty = that model's held-out set (full_sft.py's)")
    families: tuple = arg(COT_FAMILIES, "train only on these task families (default: the ones that need computation, "
                                        "where SFT is weakest; --families alone = every family)", nargs="*", type=str)
    group_size: int = arg(8, "answers sampled per prompt (G)")
    temperature: float = arg(0.7, "sampling temperature of the answers (the policy trained is the tempered one)")
    clip_eps: float = arg(0.2, "the policy ratio is clipped to [1 - eps, 1 + eps]")
    kl_coef: float = arg(0.04, "weight of the KL penalty to the starting model")
    updates: int = arg(1, "gradient steps on each batch of samples (1 = on-policy, the ratio is 1)")
    max_new_tokens: int = arg(64, "longest answer sampled, and generated when measuring accuracy (a worked "
                                  "answer needs up to ~50 tokens)")
    check_items: int = arg(200, "training prompts answered greedily at each evaluation (the best step is kept)")
    reward: str = arg("answer", "answer: 1 if the final answer is right, else 0; steps: a worked answer (data/cot.py) "
                                "that is wrong still earns half the share of its steps that match the reference's, "
                                "line by line (a process reward the checker can give); verifier: the --verifier's "
                                "score of each answer (a learned reward, for tasks no checker can score)",
                      choices=["answer", "steps", "verifier"])
    verifier: str = arg("weight/verifier", "with --reward verifier: the reward model verifier.py trained")
    # the shared training flags, with this stage's defaults
    init_from: str = "weight/sft_cot"
    out_dir: str = "weight/grpo"
    max_steps: int = 120
    batch_size: int = 8              # prompts per step; each gets group_size answers
    lr: float = 1e-4                 # measured: 3e-4 and 5e-4 lowered held-out accuracy, 2e-5 barely moved it
    min_lr: float = 1e-4             # a constant rate after warmup
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 30
    log_interval: int = 1


# what makes the default starting model, weight/sft_cot (the pipeline's sft_cot stage runs the same)
COT_SFT_COMMAND = "python full_sft.py --data cot --max_new_tokens 64 --out_dir weight/sft_cot"


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, G), G answers to each of P prompts -> advantages (P, G): each reward minus its
    group's mean, over the group's standard deviation. A group of equal rewards gets zeros."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


def step_reward(answer: str, record: dict) -> float:
    """The process reward of --reward steps: 1 for a right answer; a wrong one gets 0.5 x the share of
    the reference's worked steps (every line before its final answer) that it wrote the same, in place.
    Only a worked answer (data/cot.py: its last line is the marked final answer, "Answer: ...") has
    steps; for any other answer, even one of several lines, this is the plain 0/1 reward. In a worked
    addition each line is one digit's sum ("tens: 6+8+1=15, 5 carry 1"), so every right sum is rewarded
    on its own; in a reversal the steps are the word spelled out and its letters reversed."""
    if is_right(answer, record):
        return 1.0
    *steps, last = record["conversations"][-1]["content"].strip().split("\n")      # the reference's steps
    if not last.startswith(tuple(marker.strip() for marker in MARKERS.values())):
        return 0.0                                                                  # not a worked answer
    written = answer.strip().split("\n")
    same = sum(i < len(written) and written[i].strip() == step.strip() for i, step in enumerate(steps))
    return 0.5 * same / len(steps) if steps else 0.0


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(y_t | x_<=t) for every position (B, T) under the distribution the answers were sampled
    from (the logits divided by the temperature); 0 where y is IGNORE_INDEX."""
    logits, _ = model(x)                                                     # (B, T, V)
    scored = y != IGNORE_INDEX                                               # (B, T): the answer tokens
    logp = torch.log_softmax(logits[scored].float() / temperature, dim=-1)   # (N, V), N answer tokens
    picked = logp.gather(-1, y[scored].unsqueeze(-1)).squeeze(-1)            # (N,)
    return torch.zeros(y.shape, dtype=picked.dtype, device=y.device).masked_scatter(scored, picked)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, kl_coef: float):
    """The clipped policy-ratio objective with a KL penalty, all (B, T) but advantages (B,) and
    mask (B, T) (True on answer tokens). Returns (loss, mean KL per token)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)                                              # (B, 1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1                        # k3 estimator, >= 0
    per_token = -(surrogate - kl_coef * kl) * mask
    tokens = mask.sum(dim=1).clamp(min=1)                                    # (B,) answer lengths
    loss = (per_token.sum(dim=1) / tokens).mean()
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()


@torch.no_grad()
def sample_groups(model, tokenizer, records: list[dict], group_size: int, max_new_tokens: int,
                  temperature: float, generator: torch.Generator):
    """G sampled answers to each record's prompt -> (examples, answers): examples (x, y) with the
    targets on the answer tokens only (its <|im_end|> included, nothing after it), answers the
    decoded texts, both in order prompt 0's G answers, prompt 1's, ..."""
    prompts = [render_chat(r["conversations"][:-1], tokenizer, add_generation_prompt=True)[0] for r in records]
    repeated = [p for p in prompts for _ in range(group_size)]
    device = next(model.parameters()).device
    idx, pad_lengths = left_pad(repeated, tokenizer.eot_id, device)                   # (P * G, T)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, pad_lengths=pad_lengths, temperature=temperature,
                   stop_tokens=(tokenizer.im_end_id,), generator=generator)           # (P * G, T + n)
    model.train(was_training)
    examples, answers = [], []
    for row, prompt in enumerate(repeated):
        new = out[row, idx.shape[1]:].tolist()
        if tokenizer.im_end_id in new:
            new = new[:new.index(tokenizer.im_end_id) + 1]                           # the stop token is learned too
        answers.append(tokenizer.decode([t for t in new if t != tokenizer.im_end_id]))
        ids = prompt + new
        y = torch.tensor(ids[1:])
        y[:len(prompt) - 1] = IGNORE_INDEX                                            # only the answer is scored
        examples.append((torch.tensor(ids[:-1]), y))
    return examples, answers


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(GRPOConfig, __doc__.split("\n\n")[0].strip(), argv), argv)
    check_train_config(cfg)
    if cfg.group_size < 2:
        raise ValueError(f"--group_size {cfg.group_size}: a group needs at least 2 answers to compare")
    if cfg.updates > 1 and cfg.grad_accum > 1:
        raise ValueError("--updates > 1 reuses each batch of samples for several steps: use it with --grad_accum 1")
    rt = setup_runtime(cfg)

    # 1. the policy (trained) and the reference (a frozen copy: the KL penalty's anchor)
    model, ckpt_config = load_decoder_only(cfg.init_from, rt.device, "grpo.py", make_hint=COT_SFT_COMMAND
                                           if cfg.init_from == GRPOConfig.init_from else "python full_sft.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.reward == "verifier":             # a learned reward: it must read the policy's tokens
        reward_model, verifier_tokenizer = load_verifier(cfg.verifier, rt.device)
        if not same_tokens(verifier_tokenizer, tokenizer):
            raise ValueError(f"--verifier {cfg.verifier} reads another tokenizer than {cfg.init_from}: train it from "
                             f"a model of the same pretraining (python verifier.py --init_from {cfg.init_from})")

    # 2. prompts whose answers a checker can score: by default the ones the model was fine-tuned on (its
    # training set, and its held-out set: the accuracy full_sft.py reported, so the two compare)
    sft_train, sft_held_out, where = [], [], ""
    if not (cfg.data and cfg.eval_data):
        sft_train, sft_held_out, where = sft_data_of(ckpt_config)
        if not sft_train and where == str(DEFAULT_CHAT_DIR):          # the default chat tasks, not generated yet
            build_default_chat_data(DEFAULT_CHAT_DIR, verbose=rt.is_main)
            sft_train, sft_held_out, where = sft_data_of(ckpt_config)
    train = list(read_conversations(cfg.data)) if cfg.data else sft_train
    held_out = list(read_conversations(cfg.eval_data)) if cfg.eval_data else sft_held_out
    if not train or not held_out:
        missing = "training prompts (--data)" if not train else "held-out records (--eval_data)"
        raise ValueError(f"{cfg.init_from} names no {missing} of its own (an imported model?): give them")
    if cfg.families:
        train = [r for r in train if r.get("family") in cfg.families]
        if not train:
            raise ValueError(f"--families {' '.join(cfg.families)}: no training record of these families; name "
                             f"yours, or give --families alone for every family")
    if rt.is_main:
        print(f"prompts: {len(train):,} (families: {' '.join(cfg.families) or 'all'}) from {cfg.data or where}, "
              f"{len(held_out):,} held out" + (f" from {cfg.eval_data}" if cfg.eval_data else " (the SFT model's own)"))
    check = train[:cfg.check_items]          # the best step is chosen on training prompts, never on held-out ones

    # 3. before
    if rt.is_main:
        before = exact_match_report(model, tokenizer, held_out, cfg.max_new_tokens)
        print(f"before GRPO: {format_report(before)}")

    # 4. train: each step samples, scores and reinforces (next_batch does the sampling, with the current model)
    sample_rng = torch.Generator(device=rt.device).manual_seed(cfg.seed + 7 * rt.rank)
    history = []                             # per step: mean reward, KL, answer length
    cached = {"batch": None, "uses": 0}

    def next_batch(generator):
        if cached["batch"] is not None and cached["uses"] < cfg.updates:     # --updates > 1: the same samples again
            cached["uses"] += 1
            return cached["batch"]
        rows = torch.randint(len(train), (cfg.batch_size,), generator=generator).tolist()
        records = [train[i] for i in rows]
        examples, answers = sample_groups(model, tokenizer, records, cfg.group_size, cfg.max_new_tokens,
                                          cfg.temperature, sample_rng)
        asked = [r for r in records for _ in range(cfg.group_size)]
        if cfg.reward == "verifier":         # the verifier scores each group's answers to its prompt
            G = cfg.group_size
            rewards = torch.tensor([s for i, r in enumerate(records) for s in
                                    score_answers(reward_model, tokenizer, r["conversations"][:-1], answers[i * G:(i + 1) * G])])
        else:
            score = step_reward if cfg.reward == "steps" else (lambda a, r: float(is_right(a, r)))
            rewards = torch.tensor([score(a, r) for a, r in zip(answers, asked)])
        advantages = group_advantages(rewards.view(cfg.batch_size, cfg.group_size)).flatten()   # (P * G,)
        lengths = torch.tensor([float((y != IGNORE_INDEX).sum()) for _, y in examples])
        history.append({"reward": rewards.mean().item(), "answer_tokens": lengths.mean().item(), "kl": 0.0,
                        "groups_learning": int((rewards.view(cfg.batch_size, -1).std(dim=1) > 0).sum())})
        keep = advantages != 0                                                    # groups that teach something
        if not keep.any():                                                        # nothing to learn this step
            keep[0] = True
        x, y = collate([e for e, k in zip(examples, keep.tolist()) if k], tokenizer.eot_id)
        x, y, advantages = x.to(rt.device), y.to(rt.device), advantages[keep].to(rt.device)
        with torch.no_grad(), rt.autocast():
            ref_logp = token_logprobs(reference, x, y, cfg.temperature)
            # --updates 1: no copy needed, the loss uses the policy's own log-probs, detached (an empty tensor here)
            old_logp = token_logprobs(model, x, y, cfg.temperature) if cfg.updates > 1 else torch.empty(0)
        cached.update(batch=(x, y, advantages, ref_logp, old_logp), uses=1)
        return cached["batch"]

    def compute_loss(policy, batch):
        x, y, advantages, ref_logp, old_logp = batch
        logp = token_logprobs(policy, x, y, cfg.temperature)
        old = old_logp if old_logp.numel() else logp.detach()                      # on-policy: ratio 1
        loss, kl = grpo_loss(logp, old, ref_logp, advantages, y != IGNORE_INDEX, cfg.clip_eps, cfg.kl_coef)
        history[-1]["kl"] = kl.item()
        return loss

    accuracy_log = []                        # (step, held-out accuracy) at each evaluation

    def evaluate(scored, max_tokens):
        # the kept step is the one that answers most training prompts right (greedy); held-out accuracy is shown
        checked = exact_match_report(scored, tokenizer, check, cfg.max_new_tokens)
        shown = exact_match_report(scored, tokenizer, held_out, cfg.max_new_tokens)
        accuracy_log.append((len(history), shown["accuracy"]))
        return {"val_loss": 1.0 - checked["accuracy"], "train_accuracy": checked["accuracy"],
                "heldout_accuracy": shown["accuracy"]}

    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from}
    model.train()
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="grpo",
                          compute_loss=compute_loss, log_columns=("train_accuracy", "heldout_accuracy"))

    # 5. after: the kept weights on the held-out set, and the curves
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir, rt.device)
        after = exact_match_report(best, tokenizer, held_out, cfg.max_new_tokens)
        print(f"after GRPO: {format_report(after)}")
        write_history(Path(cfg.out_dir), history, accuracy_log)
        rewards = [h["reward"] for h in history]
        tail = rewards[-max(1, len(rewards) // 5):]
        metrics = {**before_and_after(before, after),
                   "mean_reward_first": sum(rewards[:len(tail)]) / len(tail), "mean_reward_last": sum(tail) / len(tail),
                   "kl_last": history[-1]["kl"] if history else 0.0, "group_size": cfg.group_size,
                   "steps": result["step"], "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1)}
        write_metrics(Path(cfg.out_dir), metrics)
        for e in after["examples"][::3]:
            print(f"  [{e['family']}] {e['prompt']!r} -> {e['answer']!r}")
        print(f"grpo: accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}, {change_line(metrics)}, "
              f"mean reward {metrics['mean_reward_first']:.2f} -> {metrics['mean_reward_last']:.2f} in "
              f"{result['seconds']:.0f}s of training -> {cfg.out_dir}/")
    finish(rt)


def write_history(out_dir: Path, history: list[dict], accuracy_log: list[tuple]):
    """grpo.csv (one row per step) and grpo.png: mean reward, held-out accuracy, KL, answer length."""
    with open(out_dir / "grpo.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *history[0]] if history else ["step"])
        writer.writeheader()
        for step, h in enumerate(history, 1):
            writer.writerow({"step": step, **h})
    steps = range(1, len(history) + 1)
    import matplotlib
    matplotlib.use("Agg")                   # here, not at import: a notebook importing grpo keeps its own backend
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes[[0, 2, 3]], ("reward", "kl", "answer_tokens"),
                              ("mean reward (sampled answers)", "KL to the SFT model, per token", "answer tokens")):
        ax.plot(steps, [h[key] for h in history], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].plot([s for s, _ in accuracy_log], [a for _, a in accuracy_log], marker="o")
    axes[1].set_title("held-out exact match (greedy)")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "grpo.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main_guard(main)
