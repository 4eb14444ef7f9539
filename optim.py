"""
optim.py -- how the weights move: AdamW, Muon, and the learning-rate schedule.

    make_optimizer(model, cfg, device)   AdamW for everything, or (--optimizer muon) Muon for the
                                         blocks' hidden matrices and AdamW for the rest
    lr_at(step, cfg, seconds)            linear warmup, then cosine decay to min_lr

AdamW (Loshchilov & Hutter, 2019): Adam's per-parameter step sizes, with weight decay
applied to the weights directly rather than through the gradient.

Muon (Jordan et al., 2024, as in nanochat and the modded-nanogpt speedruns): momentum,
then the update matrix is orthogonalized (every singular value pushed to about 1), so
every direction of a weight matrix learns at the same speed. On the default CPU run
Muon reached English 2.31 bpb after 130 steps where AdamW, same model and data, was at
2.70 (README, "Choices").
"""

from __future__ import annotations

import math

import torch

from runtime import cpu_has_native_bf16

def make_optimizer(model: torch.nn.Module, cfg, device: torch.device):
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
    # bf16 where its matmuls are fast (a GPU, a CPU with bf16 instructions); elsewhere bf16 is emulated
    # and ~10x slower than float32 (it took 70% of a pretraining step on a 2-core AVX2 CPU)
    fast_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
        (device.type == "cpu" and cpu_has_native_bf16())
    muon = Muon([{"params": hidden, "lr_ratio": cfg.muon_lr_ratio}], lr=cfg.lr * cfg.muon_lr_ratio,
                ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    return OptimizerGroup(adamw, muon)


@torch.no_grad()
def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, by a quintic Newton-Schulz iteration.

    X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315):
    pushes every singular value of X (after scaling it to norm <= 1) towards 1 (into
    about 0.7-1.2 after 5 steps: close enough, and much cheaper than an exact SVD).
    The iteration tolerates low precision, so it runs in bf16 where that is fast.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
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

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.ns_dtype = ns_dtype                 # the precision of the Newton-Schulz iteration

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
                p.add_(orthogonalize(update, dtype=self.ns_dtype), alpha=-group["lr"] * scale)


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


def lr_at(step: int, cfg, seconds: float = 0.0) -> float:
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
