"""
dpo.py -- Direct Preference Optimization: prefer the chosen answer over the rejected one.

    python dpo.py                                 # weight/sft + generated preference pairs -> weight/dpo/
    python dpo.py --data pairs.jsonl --eval_data held_out_pairs.jsonl --beta 0.1
    python dpo.py --preset smollm2                # SmolLM2-135M: its persona answer over its own -> weight/smollm2_dpo/

Each pair shares a prompt and has two answers: chosen (right) and rejected (wrong). With
log-probabilities of whole answers under the model being trained (pi) and a frozen copy
of the starting model (ref), DPO (Rafailov et al., 2023) minimises

    loss = -log sigmoid( beta * [ (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) ] )

so the chosen answer gains probability relative to the rejected one, while beta limits how
far pi moves from ref. The bracket, times beta, is the reward margin; held-out pairs whose
margin is positive count towards preference accuracy. A small SFT term on the chosen
answers (--sft_weight) guards against the known collapse, where both answers lose
probability and the model drifts into repetition.

Rejected answers: plausible wrong ones (a wrong count, a neighbour in the list, another
name), plus the SFT model's own wrong answers to training prompts (on-policy).

A real pretrained model: `--preset smollm2` starts from SmolLM2-135M-Instruct (the .gguf file
setup.sh installs) with the persona lesson (`--data persona`, data/persona.py): chosen is the
persona's answer, rejected the model's own answer to the same question ("I'm Dr. Elena
Martinez, ..."). A pretrained model needs a far smaller learning rate than the small one:
2e-5 here (measured), 16 steps of 8 pairs. Held-out pairs use phrasings never trained on;
general questions asked before and after show what it kept. In so few steps DPO makes the
persona's answer far more likely than the model's own (the reward margin), and the answers
move towards it ("My name is LLM."), but rarely to the letter: full_sft.py and lora.py teach
the exact answer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.chat_data import (DEFAULT_CHAT_DIR, collate, default_words, plausible_wrong_answer, preference_pair,
                            read_conversations, read_preference_pairs, sequence_limit, sft_data_of,
                            similar_length_rows, stage_data, synthetic_names, write_jsonl)
from data.persona import knowledge_check, knowledge_line, knowledge_metrics, persona_data
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX, moe_aux_loss
from runtime import finish, setup_runtime
from scoring import answerer, before_and_after, change_line, greedy_answers, task_accuracy
from tokenizer.chat import render_chat
from training import (TrainConfig, check_train_config, pretrained_defaults_note, resumed_flags, run_training,
                      write_metrics)
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_decoder_only, tokenizer_source


@dataclass
class DPOConfig(TrainConfig):
    data: str = arg("", "preference pairs (.jsonl with chosen/rejected); empty = generated from the chat tasks; "
                        "persona = the persona lesson's answers over the model's own (data/persona.py)")
    eval_data: str = arg("", "held-out preference pairs; empty = every 20th pair of --data (or generated ones)")
    task_data: str = arg("", "held-out chat tasks for accuracy before/after; empty = the base's SFT held-out set")
    init_from: str = arg("weight/sft", "the SFT model to start from (also the frozen reference)")
    beta: float = arg(0.5, "how strongly the reward is tied to staying near the reference (larger: less drift)")
    sft_weight: float = arg(1.0, "weight of an SFT loss on the chosen answers (0 = pure DPO)")
    on_policy: int = arg(2000, "training prompts answered by the SFT model; its wrong answers become rejected ones")
    max_pairs: int = arg(4800, "chat tasks turned into plausible-wrong pairs (150 steps of 32 use 4,800; "
                               "each pair costs a reference forward pass up front)")
    batch_size: int = arg(32, "pairs per micro-batch")
    eval_tokens: int = arg(0, "answer tokens of held-out pairs scored in periodic evaluations (0 = every pair)")
    max_new_tokens: int = arg(32, "longest answer generated when measuring task accuracy")
    max_len: int = arg(1024, "longest conversation of a pair, in tokens (longer pairs are skipped; at most the "
                             "model's context): keeps memory modest for a model with a long context")
    # the shared training flags, with this stage's defaults
    out_dir: str = "weight/dpo"
    lr: float = 1e-4
    min_lr: float = 1e-5
    max_steps: int = 150
    warmup_steps: int = 10
    eval_interval: int = 50


# --preset smollm2: a real pretrained model (measured, 20 steps of 8 pairs: lr 5e-6 -> held-out reward margin 2.7
# and answers barely changed; 2e-5 -> margin 6.6, answers moving towards the persona, general knowledge kept)
PRESETS = {"smollm2": dict(init_from="smollm2", data="persona", out_dir="weight/smollm2_dpo", lr=2e-5, min_lr=2e-6,
                           max_steps=16, batch_size=8, warmup_steps=2, eval_interval=16, max_pairs=48,
                           weight_decay=0.0, beta=0.1)}


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss and reward margin from summed answer log-probs, each (B,).

    margin = beta * [(pi_c - ref_c) - (pi_r - ref_r)];  loss = -log sigmoid(margin)
    """
    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def answer_logprob(model, x, y):
    """Per row: (sum of log p(y_t | x_<=t) over the answer tokens (y != IGNORE_INDEX), their count), each (B,)."""
    _, nll = model(x, targets=y, reduction="none")                            # (B, T) -log p, 0 where ignored
    return -nll.sum(-1), (y != IGNORE_INDEX).sum(-1)


def encode_pairs(pairs: list[dict], tokenizer, block_size: int, verbose: bool = True):
    """Each pair -> (chosen x, y) and (rejected x, y); targets only on the final answer (the two
    sides share everything before it, so only the answers are compared)."""
    def encode(messages):
        ids, answer_mask = render_chat(messages, tokenizer)
        last_answer = len(render_chat(messages[:-1], tokenizer, add_generation_prompt=True)[0])  # where it starts
        x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])                    # (T,) each
        counts = torch.tensor(answer_mask[1:], dtype=torch.bool) & (torch.arange(len(y)) >= last_answer - 1)
        return x, y.masked_fill(~counts, IGNORE_INDEX)
    encoded = [(encode(p["chosen"]), encode(p["rejected"])) for p in pairs]
    kept = [e for e in encoded if max(len(e[0][0]), len(e[1][0])) <= block_size]
    if len(kept) < len(encoded) and verbose:
        print(f"dpo: skipped {len(encoded) - len(kept)} pairs longer than the context of {block_size} tokens")
    return kept


@torch.no_grad()
def pair_logprobs(model, encoded, batch_size: int, pad_id: int, device):
    """log p(chosen answer), log p(rejected answer) under `model` for every pair: (N,) each.

    Used once for the reference (it never changes) and at each evaluation for the policy.
    """
    chosen, rejected = torch.zeros(len(encoded)), torch.zeros(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0][0]))   # similar lengths: little padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for side, out in ((0, chosen), (1, rejected)):
            x, y = collate([encoded[i][side] for i in rows], pad_id)
            out[rows] = answer_logprob(model, x.to(device), y.to(device))[0].float().cpu()
    return chosen, rejected


def default_pairs(model, tokenizer, on_policy: int, max_pairs: int, seed: int = 0,
                  max_new_tokens: int = 32) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs from the chat tasks: plausible wrong answers + the model's own mistakes."""
    rng = random.Random(seed)
    words, names = default_words(), synthetic_names()
    train_records = list(read_conversations(DEFAULT_CHAT_DIR / "sft_train.jsonl"))
    train_records = rng.sample(train_records, min(max_pairs, len(train_records)))
    eval_records = list(read_conversations(DEFAULT_CHAT_DIR / "sft_eval.jsonl"))

    def plausible(records):
        pairs = []
        for r in records:
            wrong = plausible_wrong_answer(r, rng, words, names)
            if wrong is not None:
                pairs.append(preference_pair(r, wrong))
        return pairs

    train_pairs, eval_pairs = plausible(train_records), plausible(eval_records)
    asked = rng.sample(train_records, min(on_policy, len(train_records)))
    answers = greedy_answers(model, tokenizer, [r["conversations"] for r in asked], max_new_tokens)
    own = [preference_pair(r, a) for r, a in zip(asked, answers)
           if a.strip() != r["conversations"][-1]["content"].strip() and a.strip()]
    print(f"dpo: {len(train_pairs):,} plausible-wrong pairs + {len(own):,} on-policy pairs (the SFT model's own "
          f"mistakes on {len(asked):,} training prompts); {len(eval_pairs):,} held-out pairs")
    return train_pairs + own, eval_pairs


def persona_pairs(model, tokenizer, max_pairs: int, seed: int = 0,
                  max_new_tokens: int = 32) -> tuple[list[dict], list[dict]]:
    """The persona lesson as preference pairs: chosen = the persona's answer, rejected = the model's own
    greedy answer to the same question (on-policy). Training pairs from max_pairs training questions,
    held-out pairs from the held-out phrasings."""
    train_records, eval_records = persona_data()
    train_records = random.Random(seed).sample(train_records, min(max_pairs, len(train_records)))

    def own_answer_pairs(records):
        answers = greedy_answers(model, tokenizer, [r["conversations"] for r in records], max_new_tokens)
        return [preference_pair(r, a) for r, a in zip(records, answers)
                if a.strip() and a.strip() != r["conversations"][-1]["content"]]
    train_pairs, eval_pairs = own_answer_pairs(train_records), own_answer_pairs(eval_records)
    if not train_pairs or not eval_pairs:
        raise ValueError("dpo: the model's own answers to the persona questions are already the persona's (or "
                         "empty), so there is no pair to learn from: start from a model that does not know them")
    print(f"dpo: {len(train_pairs):,} persona pairs (the model's own answer rejected) from {len(train_records):,} "
          f"training questions; {len(eval_pairs):,} held-out pairs")
    return train_pairs, eval_pairs


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(DPOConfig, __doc__.split("\n\n")[0].strip(), argv, presets=PRESETS), argv)
    check_train_config(cfg)
    rt = setup_runtime(cfg)
    model, ckpt_config = load_decoder_only(cfg.init_from, rt.device, "dpo.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    pad_id, block = tokenizer.eot_id, sequence_limit(model.config, cfg.max_len)
    note = pretrained_defaults_note(cfg, ckpt_config, "dpo.py")
    if note and rt.is_main:
        print(note)
    persona = cfg.data == "persona"      # a generated lesson, not a file of pairs

    # 1. preference pairs: your files (without --eval_data every 20th pair is held out), or generated
    def generated_pairs():               # from the chat tasks and this SFT model's own answers, kept with the run
        paths = Path(cfg.out_dir) / "pairs_train.jsonl", Path(cfg.out_dir) / "pairs_eval.jsonl"
        if rt.is_main:
            generated = persona_pairs(model, tokenizer, cfg.max_pairs, cfg.seed, cfg.max_new_tokens) if persona \
                else default_pairs(model, tokenizer, cfg.on_policy, cfg.max_pairs, cfg.seed, cfg.max_new_tokens)
            for path, pairs in zip(paths, generated):
                write_jsonl(path, pairs)
        return paths
    train_pairs, eval_pairs, _, _ = rt.main_first(
        lambda: stage_data(read_preference_pairs, "" if persona else cfg.data, cfg.eval_data, generated_pairs,
                           verbose=rt.is_main, tokenizer_file=tokenizer_source(cfg.init_from)))
    train = encode_pairs(train_pairs, tokenizer, block, verbose=rt.is_main)
    held_out = encode_pairs(eval_pairs, tokenizer, block, verbose=rt.is_main)

    # 2. the reference is the starting model: its log-probs are computed once, before training
    # (in the same precision as training and evaluation, so that at step 0 every margin is exactly 0)
    model.eval()
    with rt.autocast():
        ref_chosen, ref_rejected = pair_logprobs(model, train, cfg.batch_size, pad_id, rt.device)   # (N,) each
        ref_eval_chosen, ref_eval_rejected = pair_logprobs(model, held_out, cfg.batch_size, pad_id, rt.device)
    # task accuracy: on the held-out conversations the model was fine-tuned for (its config.json names them)
    # (the persona lesson: its held-out phrasings, and general questions for what the model knew)
    task_records = list(read_conversations(cfg.task_data)) if cfg.task_data else \
        persona_data()[1] if persona else sft_data_of(ckpt_config)[1]

    if rt.is_main:
        task_before = task_accuracy(model, tokenizer, task_records, cfg.max_new_tokens, "before DPO")
        known_before = knowledge_check(answerer(model, tokenizer), "before DPO", cfg.max_new_tokens) \
            if persona else None

    # 3. train: the DPO loss on batches of pairs (plus a little SFT on the chosen answers)
    lengths = torch.tensor([len(chosen[0]) + len(rejected[0]) for chosen, rejected in train])   # (N,)

    def next_batch(generator):
        rows = torch.tensor(similar_length_rows(lengths, cfg.batch_size, generator))   # random pairs, little padding
        xc, yc = collate([train[i][0] for i in rows.tolist()], pad_id)
        xr, yr = collate([train[i][1] for i in rows.tolist()], pad_id)
        return xc, yc, xr, yr, ref_chosen[rows], ref_rejected[rows]

    def compute_loss(policy, batch):     # policy: the model being trained (DDP-wrapped when distributed)
        xc, yc, xr, yr, ref_c, ref_r = batch
        pi_c, n_c = answer_logprob(policy, xc, yc)
        aux_chosen = moe_aux_loss(model)     # MoE: the balance loss of the chosen pass, read before the next pass
        pi_r, _ = answer_logprob(policy, xr, yr)
        loss, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta)
        sft = -(pi_c / n_c.clamp(min=1)).mean()                               # mean NLL per chosen token
        total = loss.mean() + cfg.sft_weight * sft
        if model.config.n_experts:       # keep the experts evenly loaded, as in pretraining: both passes count
            total = total + model.config.aux_loss_coef * (aux_chosen + moe_aux_loss(model)) / 2
        return total

    # periodic evaluations may score only the first pairs, up to --eval_tokens answer tokens; the final one all
    answer_tokens = [int((c[1] != IGNORE_INDEX).sum() + (r[1] != IGNORE_INDEX).sum()) for c, r in held_out]

    def pairs_within(max_tokens) -> int:
        n, total = 0, 0
        while n < len(held_out) and (not max_tokens or total < max_tokens):
            total += answer_tokens[n]
            n += 1
        return n

    def evaluate(scored, max_tokens):
        n = pairs_within(max_tokens)
        pi_chosen, pi_rejected = pair_logprobs(scored, held_out[:n], cfg.batch_size, pad_id, rt.device)
        loss, margin = dpo_loss(pi_chosen, pi_rejected, ref_eval_chosen[:n], ref_eval_rejected[:n], cfg.beta)
        # a pair counts as preferred when its reward margin is positive
        return {"val_loss": loss.mean().item(), "preference_accuracy": (margin > 0).float().mean().item(),
                "reward_margin": margin.mean().item()}

    meta = {"tokenizer": ckpt_config.get("tokenizer"), "init_from": cfg.init_from, "beta": cfg.beta}
    model.train()
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="dpo",
                          compute_loss=compute_loss, log_columns=("preference_accuracy", "reward_margin"))

    # 4. after: the saved weights on held-out pairs and on the tasks
    if rt.is_main:
        best, _ = load_checkpoint(cfg.out_dir, rt.device)
        best.eval()
        with rt.autocast():
            prefs = evaluate(best, None)
        task_after = task_accuracy(best, tokenizer, task_records, cfg.max_new_tokens, "after DPO")
        known_after = knowledge_check(answerer(best, tokenizer), "after DPO", cfg.max_new_tokens) \
            if persona else None
        metrics = {"preference_accuracy": prefs["preference_accuracy"], "reward_margin": prefs["reward_margin"],
                   "val_loss": prefs["val_loss"], **before_and_after(task_before, task_after), "beta": cfg.beta,
                   "sft_weight": cfg.sft_weight, "pairs": len(train), "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1), "steps": result["step"]}
        if persona:
            metrics.update(knowledge_metrics(known_before, known_after))
        write_metrics(Path(cfg.out_dir), metrics)
        print(f"dpo: held-out preference accuracy {prefs['preference_accuracy']:.1%}, reward margin "
              f"{prefs['reward_margin']:.3f}; task accuracy {task_before['accuracy']:.1%} -> "
              f"{task_after['accuracy']:.1%}, {change_line(metrics)}"
              + (f", {knowledge_line(known_before, known_after)}" if persona else "") + f" -> {cfg.out_dir}/")
    finish(rt)


if __name__ == "__main__":
    main_guard(main, processes=True)      # --nproc N: N processes (DDP), as torchrun
