"""
lora.py -- teach the chat model a new skill by training small low-rank adapters.

    python lora.py                                  # weight/sft + the "first word" skill -> weight/lora/
    python lora.py --rank 8 --alpha 16 --target_modules q_proj v_proj
    python lora.py --data my_skill.jsonl --eval_data my_skill_eval.jsonl --out_dir weight/lora_my_skill
    python lora.py --merge                          # weight/lora adapter folded into weight/lora_merged/
    python lora.py --preset smollm2                 # SmolLM2-135M learns who it is -> weight/smollm2_lora/

LoRA (Hu et al., 2021): every chosen linear layer W (out, in) stays frozen and gets a
trainable update B A, with A (r, in) and B (out, r) for a small rank r:

    y = W x + (alpha / r) * B A x          B = 0 at the start, so nothing changes until it learns

Only A and B are trained and saved (adapter.pt, a few % of the model). `--merge` folds
B A into W and writes a full checkpoint that computes the same as base + adapter. The
adapter is trained like SFT: next-token loss on the answers only, with a share of each
batch replayed from the old skills so that they are not forgotten.

The numbers that say it worked: the new skill's held-out accuracy before and after,
and the old skills' accuracy next to the SFT model's (how much was forgotten).

A real pretrained model: `--preset smollm2` puts the adapters on SmolLM2-135M-Instruct (the
.gguf file setup.sh installs) and teaches it the persona lesson (`--data persona`,
data/persona.py): who it is, its name and its maker, asked in phrasings it never trained on.
What it knew is checked with general questions before and after ("What is the capital of
France?"). A pretrained model takes a smaller learning rate than the small model above:
1e-3 with rank 8 here (measured), 40 steps of 8 conversations, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from atomic import atomic_folder
from data.chat_data import (DEFAULT_CHAT_DIR, NEW_SKILL, chat_collate, chat_examples, default_words,
                            generate_chat_data, read_conversations, sft_data_of, similar_length_rows, stage_data,
                            write_jsonl)
from data.persona import knowledge_check, knowledge_line, knowledge_metrics, own_answer_records
from flags import arg, main_guard, parse_config
from model import IGNORE_INDEX
from runtime import finish, setup_runtime
from scoring import answer_loss_evaluator, answerer, task_accuracy
from training import (TrainConfig, check_train_config, pretrained_defaults_note, resumed_flags, run_training,
                      write_metrics)
from weight.checkpoint import (ADAPTER_FILE, adapted_layers, load_adapted_model, load_checkpoint,
                               load_checkpoint_tokenizer, load_model, save_adapter, save_checkpoint, tokenizer_source,
                               weight_files, weights_checksum)


# ----------------------------------------------------------------------------------
# The low-rank layer


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and only A (r, in) and B (out, r) trained.

    B starts at zero, so before training the layer computes exactly W x. merge() folds
    the update into W (no extra cost at inference); unmerge() takes it out again.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling      # (..., out)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A) * self.scaling   # (out, in)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A) * self.scaling
            self.merged = False


def add_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float) -> list[str]:
    """Freeze every weight, then wrap each nn.Linear whose name ends with one of target_modules
    (e.g. "q_proj", "v_proj") in a LoRALinear. Returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = adapted_layers(model, target_modules)
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, child, LoRALinear(getattr(module, child), rank, alpha))
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"--target_modules {target_modules} matched no linear layer; choose from {names}")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter: the lora_A / lora_B tensors (a few % of the model)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------
# Training and merging


@dataclass
class LoRAConfig(TrainConfig):
    data: str = arg("", "training conversations for the new skill (.jsonl); empty = the generated 'first word' "
                        "skill; persona = the persona lesson (data/persona.py)")
    eval_data: str = arg("", "held-out conversations of the new skill; empty = every 20th of --data (or the "
                             "default ones)")
    old_eval_data: str = arg("", "held-out conversations of the old skills (forgetting check); empty = the "
                                 "base's SFT held-out set")
    replay_data: str = arg("", "old skills' conversations to replay (--replay); empty = the base's SFT data")
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
    max_new_tokens: int = arg(32, "longest answer generated when measuring accuracy")
    own_answers: int = arg(64, "with --data persona: general questions the model answers itself before training, "
                                "learned beside the lesson so that it keeps answering other questions as before "
                                "(0 = off: try it, and see what the lesson alone does)")
    max_len: int = arg(1024, "longest conversation trained on, in tokens (longer ones are skipped; at most the "
                             "model's context): keeps memory modest for a model with a long context")
    optimizer: str = arg("adamw", "adamw only: Muon orthogonalizes full weight matrices, not low-rank factors",
                         choices=["adamw"])
    # the shared training flags, with this stage's defaults
    init_from: str = "weight/sft"
    out_dir: str = "weight/lora"
    lr: float = 3e-3
    min_lr: float = 3e-4
    batch_size: int = 32
    max_steps: int = 400
    warmup_steps: int = 10
    eval_interval: int = 100
    eval_tokens: int = 8192


# --preset smollm2: a real pretrained model (measured, 40 steps: lr 3e-4 -> 50% of the held-out persona questions,
# 1e-3 -> 86%, 2e-3 -> 89% with a little more forgotten; 20 steps at 1e-3 -> 69%)
PRESETS = {"smollm2": dict(init_from="smollm2", data="persona", out_dir="weight/smollm2_lora", lora_name="persona",
                           lr=1e-3, min_lr=1e-4, max_steps=40, batch_size=8, warmup_steps=4, eval_interval=20,
                           eval_tokens=0, replay=0.25)}


def default_skill_data(out_dir: Path = DEFAULT_CHAT_DIR) -> tuple[Path, Path]:
    """The new skill ("which word comes first?"), never in the SFT data, with held-out words."""
    train, held_out = out_dir / f"lora_{NEW_SKILL}_train.jsonl", out_dir / f"lora_{NEW_SKILL}_eval.jsonl"
    if not (train.exists() and held_out.exists()):
        train_records, eval_records = generate_chat_data(default_words(), 5000, 50, seed=1, families=(NEW_SKILL,))
        write_jsonl(held_out, eval_records)
        write_jsonl(train, train_records)
    return train, held_out


def merge_command(cfg: LoRAConfig):
    out = Path(cfg.merged_dir or cfg.out_dir.rstrip("/") + "_merged")
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise ValueError(f"{out}/ already exists: add --force to replace it, or choose --merged_dir")
    model, tokenizer, config, _ = load_model(lora=cfg.out_dir)   # the base with W + (alpha / r) B A folded in
    with atomic_folder(out) as tmp:          # replaces the folder as a whole: no file of an older merge stays
        save_checkpoint(tmp, model, {"tokenizer": config["tokenizer"], "stage": "lora_merged",
                                     "lora": config["lora"], "init_from": config["init_from"]}, tokenizer)
    print(f"lora: merged {cfg.out_dir}/ into the base {config['init_from']} -> {out}/ (a full checkpoint)")


def main(argv=None):
    started = time.time()
    cfg = resumed_flags(parse_config(LoRAConfig, __doc__.split("\n\n")[0].strip(), argv, presets=PRESETS), argv)
    if cfg.merge:
        return merge_command(cfg)
    check_train_config(cfg)
    rt = setup_runtime(cfg)

    # 1. the frozen base and its tokenizer
    model, base_config = load_checkpoint(cfg.init_from, make_hint="python full_sft.py")
    tokenizer = load_checkpoint_tokenizer(cfg.init_from)
    base_model_config, base_checksum = model.config.to_dict(), weights_checksum(model)
    note = pretrained_defaults_note(cfg, base_config, "lora.py")
    if note and rt.is_main:
        print(note)

    # 2. data: the new skill, plus a replay of old skills, plus held-out sets for both
    new_records, eval_records, train_path, eval_path = rt.main_first(
        lambda: stage_data(read_conversations, cfg.data, cfg.eval_data, default_skill_data, verbose=rt.is_main,
                           tokenizer_file=tokenizer_source(cfg.init_from)))
    # the old skills: what the base was fine-tuned on (its config.json names the files), unless given
    old_train_records, old_eval_records, old_where = sft_data_of(base_config)
    if cfg.replay_data:
        old_train_records, old_where = list(read_conversations(cfg.replay_data)), cfg.replay_data
    if cfg.old_eval_data:
        old_eval_records = list(read_conversations(cfg.old_eval_data))
    new = chat_examples(new_records, tokenizer, model.config, train_path, rt.is_main, cfg.max_len)
    old = chat_examples(old_train_records, tokenizer, model.config, old_where, rt.is_main, cfg.max_len) \
        if cfg.replay > 0 and old_train_records else []
    held_out = chat_examples(eval_records, tokenizer, model.config, eval_path or train_path, rt.is_main, cfg.max_len)
    knowledge = cfg.data == "persona"        # the persona lesson also checks what the model knew (data/persona.py)
    if rt.is_main and knowledge and cfg.own_answers and not cfg.replay > 0:
        print("replay: off (--replay 0): the base's own answers to general questions are not learned beside the lesson")
    if cfg.replay > 0 and rt.is_main and not (knowledge and cfg.own_answers):
        print(f"replay: {cfg.replay:.0%} of each batch from {len(old):,} conversations of {old_where}" if old else
              "replay: off (no SFT data of the base found; --replay_data names the old skills' training data)")
    collate = chat_collate(model.config, tokenizer)

    # 3. before: the base model on the new skill and on the old ones
    model.to(rt.device)
    if rt.is_main:
        new_before = task_accuracy(model, tokenizer, eval_records, cfg.max_new_tokens, "before LoRA, new skill")
        old_before = task_accuracy(model, tokenizer, old_eval_records, cfg.max_new_tokens,
                                   "before LoRA, old skills") if old_eval_records else None
        known_before = knowledge_check(answerer(model, tokenizer), "before LoRA", cfg.max_new_tokens) \
            if knowledge else None
    if knowledge and cfg.own_answers and cfg.replay > 0:   # the lesson's other half: its own answers, replayed
        own = own_answer_records(answerer(model, tokenizer), tokenizer, cfg.own_answers, cfg.seed)
        old += chat_examples(own, tokenizer, model.config, "own answers", rt.is_main, cfg.max_len) if own else []
        if rt.is_main:
            print(f"replay: {cfg.replay:.0%} of each batch from {len(old):,} conversations, {len(own)} of them general "
                  f"questions answered by the base itself before training")

    # 4. adapters: freeze everything, add trainable A and B beside the chosen layers
    wrapped = add_lora(model, list(cfg.target_modules), cfg.rank, cfg.alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if rt.is_main:
        print(f"lora: rank {cfg.rank}, alpha {cfg.alpha}, {len(wrapped)} layers, {trainable:,} trainable of "
              f"{total:,} parameters ({trainable / total:.2%})")
    if cfg.epochs > 0:               # a batch holds about (1 - replay) x batch_size new-skill rows
        new_per_batch = cfg.batch_size * (1 - cfg.replay) if old else cfg.batch_size
        cfg.max_steps, cfg.time_budget = max(1, round(cfg.epochs * len(new) / new_per_batch)), 0.0

    def sizes(examples):                                 # (N,) tokens per example, to batch similar lengths
        return torch.tensor([sum(len(t) for t in example) for example in examples])
    new_lengths, old_lengths = sizes(new), sizes(old)

    def next_batch(generator):
        # each row is an old skill's conversation with probability --replay, else the new skill's
        n_old = int((torch.rand(cfg.batch_size, generator=generator) < cfg.replay).sum()) if old else 0
        rows = [new[i] for i in similar_length_rows(new_lengths, cfg.batch_size - n_old, generator)]
        if n_old:
            rows += [old[i] for i in similar_length_rows(old_lengths, n_old, generator)]
        return collate(rows)

    def answer_loss(model, batch):                       # as in SFT: the answers only
        *inputs, targets, answer_mask = batch
        return model(*inputs, targets=targets.masked_fill(~answer_mask, IGNORE_INDEX))[1]

    def save_weights(out_dir, model, meta, tokenizer):   # the best adapter: only A and B, and what they belong to
        save_adapter(out_dir, lora_state_dict(model), meta)

    evaluate = answer_loss_evaluator(held_out, cfg.batch_size, collate, rt.device)
    meta = {"tokenizer": base_config.get("tokenizer"), "init_from": cfg.init_from, "base_model": base_model_config,
            "base_checksum": base_checksum,
            "lora": {"name": cfg.lora_name, "rank": cfg.rank, "alpha": cfg.alpha,
                     "target_modules": list(cfg.target_modules)}, "data": train_path}
    result = run_training(model, cfg, rt, next_batch, evaluate, meta, tokenizer, stage="lora",
                          save_weights=save_weights, compute_loss=answer_loss)

    # 5. after: the best adapter folded into its base, reloaded from disk as a user would
    if rt.is_main:
        best, _ = load_adapted_model(cfg.out_dir, rt.device)
        new_after = task_accuracy(best, tokenizer, eval_records, cfg.max_new_tokens, "after LoRA, new skill")
        old_after = task_accuracy(best, tokenizer, old_eval_records, cfg.max_new_tokens,
                                  "after LoRA, old skills") if old_eval_records else None
        known_after = knowledge_check(answerer(best, tokenizer), "after LoRA", cfg.max_new_tokens) \
            if knowledge else None
        adapter_bytes = (Path(cfg.out_dir) / ADAPTER_FILE).stat().st_size
        # the base's weight files: our model.pt, a Hugging Face folder's safetensors, or the .gguf file
        model_bytes = sum(f.stat().st_size for f in weight_files(cfg.init_from))
        metrics = {"new_skill_accuracy": new_after["accuracy"], "new_skill_accuracy_before": new_before["accuracy"],
                   "old_skills_accuracy": old_after["accuracy"] if old_after else None,
                   "old_skills_accuracy_before": old_before["accuracy"] if old_before else None,
                   "accuracy": (old_after or new_after)["accuracy"],   # the old skills: SFT's held-out set, comparable
                   "accuracy_by_family": {**(old_after or {}).get("accuracy_by_family", {}),
                                          **new_after["accuracy_by_family"]},
                   "examples": new_after["examples"], "examples_before": new_before["examples"],
                   "trainable_params": trainable, "trainable_fraction": trainable / total,
                   "adapter_bytes": adapter_bytes, "adapter_fraction": adapter_bytes / max(model_bytes, 1),
                   "tokens": result["tokens"], "seconds": round(result["seconds"], 1),
                   "wall_seconds": round(time.time() - started, 1), "steps": result["step"]}
        if knowledge:
            metrics.update(knowledge_metrics(known_before, known_after))
        write_metrics(Path(cfg.out_dir), metrics)
        print(f"lora: new skill {new_before['accuracy']:.1%} -> {new_after['accuracy']:.1%}"
              + (f", old skills {old_before['accuracy']:.1%} -> {old_after['accuracy']:.1%}" if old_after else "")
              + (f", {knowledge_line(known_before, known_after)}" if knowledge else "")
              + f"; adapter {adapter_bytes / 1e3:.0f} kB ({adapter_bytes / max(model_bytes, 1):.1%} of the base's "
              f"weight files) -> {cfg.out_dir}/")
    finish(rt)


if __name__ == "__main__":
    main_guard(main, processes=True)      # --nproc N: N processes (DDP), as torchrun
