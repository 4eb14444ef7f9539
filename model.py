"""
model.py -- one decoder-only Transformer, two flavours, one config.

    flavour="gpt2"   learned positions, LayerNorm, GELU MLP, biases, tied embeddings
    flavour="llama"  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head),
                     optional q/k/v bias (Qwen2), no other biases

Every variant is a switch of `ModelConfig`; a checkpoint stores its config as a
dict, so `build_model(ModelConfig.from_dict(cfg))` rebuilds the exact network. This file imports
nothing from the project: the network knows no tokenizer, no file format, no stage.

Shapes in comments: B batch, T time (tokens), C n_embd, H heads, Hkv key/value
heads, D head_dim = C // H, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (prompt tokens, padding)

FLAVOURS = {
    # flavour -> defaults for every switch the flavour decides
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True, tie_embeddings=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, tie_embeddings=True),
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256        # context length (max tokens the model sees at once)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: Optional[int] = None   # key/value heads for grouped-query attention; None = n_head
    flavour: str = "llama"       # "gpt2" or "llama"; fills the switches below when they are None
    position: Optional[str] = None    # "learned" | "rope"
    norm: Optional[str] = None        # "layernorm" | "rmsnorm"
    mlp: Optional[str] = None         # "gelu" | "swiglu"
    bias: Optional[bool] = None       # biases in linear layers and LayerNorm
    qkv_bias: Optional[bool] = None   # biases on q, k, v only (Qwen2 has them, Llama not)
    tie_embeddings: Optional[bool] = None  # output head shares the token embedding matrix
    ffn_hidden: Optional[int] = None  # feed-forward width; None = 4C (gelu) or ~8C/3 rounded (swiglu)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # Mixture-of-Experts feed-forward (n_experts = 0: the dense feed-forward above)
    n_experts: int = 0                # routed experts per block
    top_k: int = 2                    # experts each token is sent to
    n_shared_experts: int = 0         # experts every token always goes through (DeepSeek-style)
    expert_hidden: Optional[int] = None   # width of one expert; None = ffn_hidden / (top_k + n_shared_experts)
    aux_loss_coef: float = 0.01       # weight of the load-balancing loss added to the training loss
    capacity_factor: float = 0.0      # > 0: an expert takes at most this x its fair share of tokens (extra ones dropped, counted)
    # encoder-decoder (Seq2Seq): n_encoder_layer > 0 adds an encoder of that many blocks before the n_layer decoder blocks
    n_encoder_layer: int = 0
    decoder_start_id: int = 0         # the token the decoder starts from (the tokenizer's <|endoftext|>)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {self.flavour!r}: use one of {sorted(FLAVOURS)}")
        for name, value in FLAVOURS[self.flavour].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":  # 2/3 of 4C keeps the parameter count of a 4C GELU MLP
                self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.ffn_hidden = 4 * self.n_embd
        if self.n_experts and self.expert_hidden is None:
            # equal active parameters: the experts a token uses are together as wide as the dense ffn
            self.expert_hidden = max(8, self.ffn_hidden // (self.top_k + self.n_shared_experts))
        self.validate()

    def validate(self):
        """Raise ValueError (one line, with the fix) for configs no network can have."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             f"pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                             f"each key/value head must serve the same number of query heads")
        if self.n_encoder_layer < 0:
            raise ValueError(f"n_encoder_layer must be >= 0 (0 = decoder-only), got {self.n_encoder_layer}")
        if self.n_experts < 0 or self.n_shared_experts < 0:
            raise ValueError("n_experts and n_shared_experts must be >= 0")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}: "
                             f"each token picks top_k of the experts")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = no limit), got {self.capacity_factor}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.n_embd // self.n_head}: change n_embd or n_head")
        for name, allowed in (("position", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}: the checkpoint is from a newer version?")
        return cls(**d)


# ----------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight   (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # compute in float32 for stability under bf16 autocast
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_positions, head_dim) for rotary embeddings.

    Pair i of a head vector rotates by angle pos * theta^(-2i/D); the "rotate half"
    layout (pairs are (x[i], x[i + D/2])) is the one Llama/Qwen checkpoints use.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (D/2,)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)          # (P, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                              # (P, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position: x*cos + rotate_half(x)*sin, cos/sin (T, D), or
    (B, 1, T, D) when each row of a left-padded batch has its own positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, Hkv, max_len, D).

    `pos` is how many positions are filled. Generation runs the prompt once (prefill),
    then one token at a time, each step reading all cached keys instead of recomputing them.
    max_len is what one generation needs (prompt + new tokens), not the whole context:
    a model with a 32k context answering 200 tokens after a 50-token prompt keeps 250.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layer_k = [self.k[i] for i in range(config.n_layer)]     # per-layer views (B, Hkv, max_len, D)
        self.layer_v = [self.v[i] for i in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at the current position; return all keys/values so far."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > {self.max_len}")
        keys, values = self.layer_k[layer], self.layer_v[layer]
        keys.narrow(2, self.pos, T).copy_(k)
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)   # (B, Hkv, end, D) views, no copy


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads (n_kv_head <= n_head): causal, unless
    an attn_mask says otherwise."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.o_proj.is_residual_projection = True
        self.use_rope = config.position == "rope"
        self.dropout = config.dropout

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None):
        """attn_mask (B, 1, T, S) bool, True = may attend: given for left-padded batches
        (see padded_attention_mask), or (B, 1, 1, S) from a Seq2Seq encoder (padding only);
        None = the plain causal mask."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)   # (B, Hkv, start+T, D)
        # grouped-query attention: each group of H/Hkv query heads shares one key/value head;
        # enable_gqa lets the kernel do that without copying k and v H/Hkv times
        gqa = self.n_kv_head != self.n_head
        p_drop = self.dropout if self.training else 0.0     # training never uses a KV cache
        if attn_mask is not None:
            # left-padded batch: causal, and no query ever sees a padding key (the encoder
            # of a Seq2Seq passes a padding-only mask: bidirectional)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa, dropout_p=p_drop)
        elif start == 0:
            # no cached past: the usual lower-triangular causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa, dropout_p=p_drop)
        elif T == 1:
            # one new token after the cache: it may see every cached key, so no mask at all
            # (a mask would also rule out the fastest attention kernels)
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # new query at absolute position start+i may see keys 0..start+i
            q_pos = torch.arange(start, start + T, device=x.device).unsqueeze(1)   # (T, 1)
            k_pos = torch.arange(start + T, device=x.device).unsqueeze(0)          # (1, start+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)    # (B, T, C)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """GELU MLP: W2 gelu(W1 x).   SwiGLU: W2 (silu(Wg x) * W1 x)."""

    def __init__(self, config: ModelConfig, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class MoEFeedForward(nn.Module):
    """Mixture of Experts: a router sends each token to its top_k experts (small feed-forwards).

        p = softmax(W_router x)                      (E,)  one probability per expert
        y = sum over the top_k experts e of  (p_e / sum of the top_k p) * expert_e(x)
            + sum over the shared experts s of  expert_s(x)

    Only top_k of the E experts run for a token, so the model has E/top_k times the
    feed-forward parameters of a dense model with the same compute per token.

    The load-balancing loss (Switch Transformer) is E * sum_e f_e * P_e, with f_e the
    share of routed slots that went to expert e and P_e its mean router probability:
    1.0 when routing is uniform, up to E / top_k when every token picks the same top_k experts
    (E with top-1: one expert takes everything).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.capacity_factor = config.capacity_factor
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config, config.expert_hidden) for _ in range(config.n_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config, config.expert_hidden)
                                            for _ in range(config.n_shared_experts))
        self.aux_loss = torch.zeros(())          # of the last forward pass (part of the training loss)
        self.reset_stats()

    def reset_stats(self):
        """Running totals for logging: routed slots per expert, aux loss, dropped tokens."""
        self.stat_load = torch.zeros(self.n_experts)
        self.stat_aux, self.stat_calls, self.stat_dropped, self.stat_slots = 0.0, 0, 0, 0

    def route(self, x: torch.Tensor):
        """x (N, C) -> top-k expert ids (N, k), their renormalised weights (N, k), router probs (N, E)."""
        probs = self.router(x).float().softmax(dim=-1)                 # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)              # (N, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)          # the chosen experts' weights sum to 1
        return experts, weights, probs

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                         # (N, C), N = B*T tokens
        experts, weights, probs = self.route(flat)
        slot_expert = experts.reshape(-1)                               # (N*k,) the expert of each routed slot
        slot_weight = weights.reshape(-1)                               # (N*k,)
        slot_token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(self.top_k)  # (N*k,)

        # group the slots by expert (a stable sort), then run each expert once on all of its tokens
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.n_experts)     # (E,)
        capacity = math.ceil(self.capacity_factor * slot_expert.numel() / self.n_experts) \
            if self.capacity_factor > 0 else None
        out = torch.zeros_like(flat)
        dropped, start = 0, 0
        for e, n in enumerate(counts.tolist()):                         # a loop over experts, never over tokens
            slots = order[start:start + n]
            start += n
            if capacity is not None and n > capacity:                   # over capacity: the last ones are dropped
                dropped += n - capacity
                slots = slots[:capacity]
            if slots.numel() == 0:
                continue
            tokens = slot_token[slots]
            y = self.experts[e](flat[tokens]) * slot_weight[slots].unsqueeze(1).to(flat.dtype)   # (n, C)
            out.index_add_(0, tokens, y.to(out.dtype))
        for shared in self.shared_experts:
            out = out + shared(flat)

        # load balancing: fraction of slots per expert (f) times mean router probability (P)
        f = counts.float() / slot_expert.numel()                         # (E,)
        P = probs.mean(dim=0)                                           # (E,)
        self.aux_loss = self.n_experts * (f * P).sum()
        with torch.no_grad():                                          # for logging only
            self.stat_load = self.stat_load.to(counts.device) + counts
            self.stat_aux = self.stat_aux + self.aux_loss.detach()
            self.stat_calls += 1
            self.stat_dropped += dropped
            self.stat_slots += slot_expert.numel()
        return out.view(B, T, C)


def make_feed_forward(config: ModelConfig) -> nn.Module:
    """The one place a block's feed-forward is chosen: dense, or a Mixture of Experts."""
    return MoEFeedForward(config) if config.n_experts else FeedForward(config)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        self.ffn = make_feed_forward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, attn_mask=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv_cache, attn_mask))
        x = x + self.ffn(self.ffn_norm(x))
        return x


# ----------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, block: type = Block, rope_positions: int = 0):
        """block and rope_positions (default: block_size) are for Seq2Seq, whose decoder blocks
        add cross-attention and whose RoPE tables reach past the source."""
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.head_dim, rope_positions or config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (positions, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02); projections into the residual stream scaled by
        # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops token/position tables;
        active counts only the experts one token uses (top_k of n_experts, plus the shared ones)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if hasattr(self, "pos_emb"):
                n -= self.pos_emb.weight.numel()
        if active:
            for moe in self.moe_layers():
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                n -= (moe.n_experts - moe.top_k) * per_expert
        return n

    def summary(self) -> str:
        """A short, human-readable description of the architecture."""
        c = self.config
        attn = f"{c.n_head} heads" + (f" / {c.n_kv_head} kv heads (GQA)" if c.n_kv_head != c.n_head else "")
        ffn = f"{c.mlp} ffn {c.ffn_hidden}"
        if c.n_experts:
            shared = f" + {c.n_shared_experts} shared" if c.n_shared_experts else ""
            ffn = (f"MoE: top {c.top_k} of {c.n_experts} {c.mlp} experts{shared} of width {c.expert_hidden} "
                   f"({self.num_params(active=True) / 1e6:.2f}M params active per token)")
        kind, layers = "GPT", f"{c.n_layer} layers"
        if c.n_encoder_layer:
            kind, layers = "Seq2Seq", f"{c.n_encoder_layer} encoder + {c.n_layer} decoder layers (cross-attention)"
        return (f"{kind}[{c.flavour}] {self.num_params() / 1e6:.2f}M params "
                f"({self.num_params(non_embedding=True) / 1e6:.2f}M non-embedding): "
                f"{layers} x {c.n_embd} wide, {attn}, head_dim {c.head_dim}, "
                f"{c.position} positions, {c.norm}, {ffn}, context {c.block_size}, vocab {c.vocab_size}"
                f"{', tied embeddings' if c.tie_embeddings else ''}")

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, reduction: str = "mean",
                pad_lengths: Optional[torch.Tensor] = None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V) and, if targets (B, T) are given, the loss.

        Targets equal to IGNORE_INDEX (-100) do not count. reduction="none" returns the
        loss per position (B, T) (0 where ignored), for bits-per-byte and log-prob sums.
        With a kv_cache, idx are the next tokens after those already cached.
        pad_lengths (B,): a left-padded batch, row b starting with pad_lengths[b] padding
        tokens; no real token attends to them and positions count from each row's first
        real token. last_only: logits for the last position only (B, 1, V), all generation needs.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context "
                             f"(block_size={self.config.block_size})")
        x = self.tok_emb(idx)                                            # (B, T, C)
        rope, attn_mask = None, None
        if pad_lengths is None:
            if self.config.position == "learned":
                x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
            else:
                rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # (T, D) each
        else:
            # every row has its own positions: row b's first real token is position 0
            positions = torch.arange(start, start + T, device=idx.device) - pad_lengths.view(B, 1)
            positions = positions.clamp(min=0)                           # (B, T); padding sits at 0
            if self.config.position == "learned":
                x = x + self.pos_emb(positions)
            else:
                rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))  # (B, 1, T, D)
            attn_mask = padded_attention_mask(pad_lengths, start, T)     # (B, 1, T, start+T)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        if last_only:
            x = x[:, -1:, :]                                             # (B, 1, C)
        return self.head_and_loss(x, targets, reduction)

    def head_and_loss(self, x: torch.Tensor, targets: Optional[torch.Tensor], reduction: str = "mean"):
        """Final norm and output head: x (B, T, C) -> logits (B, T, V), and the cross-entropy on targets."""
        logits = self.lm_head(self.final_norm(x))                        # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        if reduction == "none":
            loss = loss.view(targets.shape)
        elif self.training and self.config.n_experts:
            loss = loss + self.config.aux_loss_coef * self.moe_aux_loss()   # keep the experts evenly loaded
        return logits, loss

    # ------------------------------------------------------------------ Mixture of Experts

    def moe_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def moe_aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the last forward pass over the MoE blocks (0 for a dense model)."""
        layers = self.moe_layers()
        return sum(m.aux_loss for m in layers) / len(layers) if layers else torch.zeros(())

    def moe_stats(self, reset: bool = True) -> dict:
        """Routing since the last reset: mean aux loss, share of routed slots per expert (all layers), dropped share."""
        layers = self.moe_layers()
        if not layers or not sum(m.stat_calls for m in layers):
            return {}
        load = sum(m.stat_load.float().cpu() for m in layers)
        stats = {"moe_aux_loss": sum(float(m.stat_aux) / max(1, m.stat_calls) for m in layers) / len(layers),
                 "expert_share": (load / load.sum()).tolist(),
                 "dropped_share": sum(m.stat_dropped for m in layers) / max(1, sum(m.stat_slots for m in layers))}
        if reset:
            for m in layers:
                m.reset_stats()
        return stats

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)

    @torch.inference_mode()   # like no_grad, and less work per op; the yielded tokens are inference tensors
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                        pad_lengths: Optional[torch.Tensor] = None, **sampling) -> Iterator[torch.Tensor]:
        """Yield new tokens (B,) one step at a time after the prompt idx (B, T).

        With the cache: one forward over the prompt (prefill), then one token per step.
        Without it: the whole sequence is recomputed every step (slow; for comparison).
        pad_lengths (B,): prompts of different lengths, left-padded (see left_pad).
        sampling: temperature, top_k, top_p, min_p, the penalties, stop_tokens, generator
        (see decode_tokens). The loop ends when every row has produced a stop token, after
        max_new_tokens, or at the end of the context.
        """
        B, T = idx.shape
        if T >= self.config.block_size:
            raise ValueError(f"prompt of {T} tokens does not fit the context of "
                             f"{self.config.block_size} tokens: shorten it")
        max_new_tokens = min(max_new_tokens, self.config.block_size - T)
        if pad_lengths is not None and not bool(pad_lengths.any()):
            pad_lengths = None                       # nothing padded: the plain causal path
        cache = self.new_kv_cache(B, T + max_new_tokens) if use_cache else None

        def next_logits(sequence, step_input):
            if use_cache:                            # only the new tokens: the cache holds the rest
                logits, _ = self(step_input, kv_cache=cache, pad_lengths=pad_lengths, last_only=True)
            else:
                logits, _ = self(sequence, pad_lengths=pad_lengths, last_only=True)
            return logits[:, -1, :]                                      # (B, V)
        yield from decode_tokens(next_logits, idx, max_new_tokens, self.config.vocab_size,
                                 seen_pad_lengths=pad_lengths, **sampling)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt (B, T) -> prompt plus generated tokens (B, T + n), an ordinary tensor (trainable on)."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t.unsqueeze(1) for t in new], dim=1)


def decode_tokens(next_logits: Callable, start: torch.Tensor, max_new_tokens: int, vocab_size: int,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, stop_tokens: tuple = (), generator: Optional[torch.Generator] = None,
                  seen_pad_lengths: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """The sampling loop shared by every model: yield one new token per row (B,) per step.

    next_logits(sequence, step_input) -> logits (B, V) for the next position, where
    sequence (B, t) is everything so far and step_input (B, n) what is new since the
    last call (the whole start first, then one token). The tokens of `start` (minus
    left padding, seen_pad_lengths) count as already seen for the repetition penalty.
    A row is done at its first stop token (its later tokens mean nothing).
    """
    B, T = start.shape
    penalize = repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
    if penalize:
        real = torch.ones_like(start, dtype=torch.float32)           # (B, T): 1 = a real prompt token
        if seen_pad_lengths is not None:
            real = (torch.arange(T, device=start.device) >= seen_pad_lengths.view(B, 1)).float()
        seen = torch.zeros(B, vocab_size, device=start.device).scatter_add_(1, start, real) > 0   # (B, V)
        counts = torch.zeros(B, vocab_size, device=start.device)     # (B, V) times generated
    finished = torch.zeros(B, dtype=torch.bool, device=start.device)
    stop = torch.tensor(list(stop_tokens), dtype=start.dtype, device=start.device)
    sequence = torch.empty(B, T + max_new_tokens, dtype=start.dtype, device=start.device)  # (B, T + n), filled as we go
    sequence[:, :T] = start
    step_input = start
    for t in range(T, T + max_new_tokens):
        logits = next_logits(sequence[:, :t], step_input)           # (B, V)
        if penalize:
            logits = apply_penalties(logits, seen, counts, repetition_penalty, frequency_penalty, presence_penalty)
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
        yield next_token
        if stop_tokens:
            finished |= torch.isin(next_token, stop)
            if finished.all():
                return
        sequence[:, t] = next_token
        step_input = sequence[:, t:t + 1]                            # (B, 1)
        if penalize:
            seen.scatter_(1, step_input, True)
            counts.scatter_add_(1, step_input, torch.ones_like(step_input, dtype=counts.dtype))


def padded_attention_mask(pad_lengths: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, start+T) bool: query start+i of row b may see key j if j <= start+i (causal)
    and j >= pad_lengths[b] (not padding). A padding query sees only itself, so no row of
    the mask is empty (a softmax over nothing would be NaN)."""
    q_pos = torch.arange(start, start + T, device=pad_lengths.device).view(1, T, 1)   # (1, T, 1)
    k_pos = torch.arange(start + T, device=pad_lengths.device).view(1, 1, start + T)  # (1, 1, S)
    pad = pad_lengths.view(-1, 1, 1)                                                  # (B, 1, 1)
    mask = (k_pos <= q_pos) & ((k_pos >= pad) | (k_pos == q_pos))                   # (B, T, S)
    return mask.unsqueeze(1)


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> idx (B, T_max) padded on the left with pad_id,
    and pad_lengths (B,). Left, so that every row's next token lands in the same column."""
    longest = max(len(s) for s in sequences)
    idx = torch.tensor([[pad_id] * (longest - len(s)) + list(s) for s in sequences], device=device)
    pad_lengths = torch.tensor([longest - len(s) for s in sequences], device=device)
    return idx, pad_lengths


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, repetition_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """Discourage repeats in logits (B, V); seen (B, V) bool: in the prompt or generated; counts (B, V):
    times generated so far.

    repetition (CTRL paper, as in HF): a seen token's logit is divided by the penalty if
    positive, multiplied if negative. frequency / presence (OpenAI): logit -= frequency * count
    + presence * (count > 0).
    """
    logits = logits.float()
    if repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if frequency_penalty != 0.0 or presence_penalty != 0.0:
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).float()
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                      min_p: Optional[float] = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V).

    temperature 0 -> argmax (greedy). Otherwise p = softmax(logits / temperature), keeping only
    the top_k most likely tokens, the smallest set whose probability reaches top_p, and the
    tokens with p >= min_p * max(p); then one draw from what is left.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]       # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the best one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)                                        # (B, V)
    if min_p is not None and min_p > 0:
        # p < min_p * p_max is dropped: a cut-off that follows how confident the model is
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------
# Encoder-decoder (Seq2Seq): the same blocks, plus an encoder that reads the whole source


class CrossAttention(Attention):
    """The decoder's queries attend to the encoder's output, the memory: q from x, k and v from memory.

    No causal mask (the whole source is known); padding in the source is masked out.
    With RoPE, the keys are rotated by their source positions and the queries as if the
    answer came right after the source (position source_length + t), so cross-attention
    sees the same relative distances as a decoder-only model attending to its prompt.
    During generation the memory's keys and values are computed once and reused.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config, layer_idx=-1)       # the same projections; no KV cache of its own

    def memory_kv(self, memory: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, C) -> keys and values (B, Hkv, S, D), computed once per source."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, S, D)
        v = self.v_proj(memory).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def forward(self, x, memory_kv, source_mask, rope=None):
        """x (B, T, C); source_mask (B, 1, 1, S) bool, True = a real source token."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)          # (B, H, T, D)
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v = memory_kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask, enable_gqa=self.n_kv_head != self.n_head,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderBlock(Block):
    """A decoder-only block with cross-attention between self-attention and the feed-forward:

        x + self_attn(norm(x))  ->  x + cross_attn(norm(x), memory)  ->  x + ffn(norm(x))
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.cross_norm = make_norm(config)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, rope=None, kv_cache=None, memory=None, cross_rope=None):
        memory_kv, source_mask = memory
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv_cache))
        x = x + self.resid_dropout(self.cross_attn(self.cross_norm(x), memory_kv, source_mask, cross_rope))
        x = x + self.ffn(self.ffn_norm(x))
        return x


class Seq2Seq(GPT):
    """Encoder-decoder Transformer (ModelConfig.n_encoder_layer > 0), e.g. for a dialogue model:

        source (B, S) -> encoder: n_encoder_layer blocks, every token sees every other -> memory (B, S, C)
        target (B, T) -> decoder: n_layer blocks, causal self-attention + cross-attention to
                         the memory + feed-forward -> logits (B, T, V)

    The decoder reads [decoder_start_id, y1, ..., y_{T-1}] and learns to predict [y1, ..., yT].
    One token embedding serves the encoder, the decoder and (tied) the output head. Weight
    init, parameter counts, the MoE helpers and the KV cache (decoder self-attention only)
    come from GPT; encoding, forward and generation are its own.
    """

    def __init__(self, config: ModelConfig):
        # the decoder is GPT's, with cross-attention in its blocks; its RoPE tables are twice the
        # context long, as cross-attention queries sit after the source (source_length + t)
        super().__init__(config, block=DecoderBlock, rope_positions=2 * config.block_size)
        if config.position == "learned":
            self.enc_pos_emb = nn.Embedding(config.block_size, config.n_embd)    # encoder positions
            self.enc_pos_emb.apply(self._init_weights)
        self.encoder = nn.ModuleList(Block(config, i) for i in range(config.n_encoder_layer))
        self.encoder_norm = make_norm(config)
        self.encoder.apply(self._init_weights)

    def rope_at(self, positions: torch.Tensor):
        """RoPE tables at positions (T,) -> (T, D) each, or (B, T) -> (B, 1, T, D) each; None without RoPE."""
        if self.config.position != "rope":
            return None
        if positions.dim() == 1:
            return self.rope_cos[positions], self.rope_sin[positions]
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def encode(self, src: torch.Tensor, pad_lengths: Optional[torch.Tensor] = None):
        """src (B, S), left-padded by pad_lengths (B,) -> memory (B, S, C), source_mask (B, 1, 1, S),
        source positions (B, S) (counted from each row's first real token)."""
        B, S = src.shape
        if S > self.config.block_size:
            raise ValueError(f"source of {S} tokens is longer than the context (block_size={self.config.block_size})")
        pad = pad_lengths.view(B, 1) if pad_lengths is not None else torch.zeros(B, 1, dtype=torch.long, device=src.device)
        columns = torch.arange(S, device=src.device).view(1, S)
        positions = (columns - pad).clamp(min=0)                                     # (B, S)
        source_mask = (columns >= pad).view(B, 1, 1, S)            # every token sees every real token
        x = self.tok_emb(src)
        if self.config.position == "learned":
            x = x + self.enc_pos_emb(positions)
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, self.rope_at(positions), None, source_mask)   # a mask and no cache: bidirectional
        return self.encoder_norm(x), source_mask, positions

    def cross_memory(self, src: torch.Tensor, pad_lengths: Optional[torch.Tensor] = None):
        """Encode src, then what every decoder step needs of it: each block's cross-attention keys
        and values, the source mask, and the source lengths (B,). The encoder runs once per source."""
        memory, source_mask, positions = self.encode(src, pad_lengths)
        rope = self.rope_at(positions)
        kv = [block.cross_attn.memory_kv(memory, rope) for block in self.blocks]
        return kv, source_mask, source_mask.sum(dim=-1).view(-1)                     # lengths (B,)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: Optional[torch.Tensor] = None,
                pad_lengths: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                memory=None, reduction: str = "mean", last_only: bool = False):
        """src (B, S) source ids, tgt (B, T) decoder inputs -> logits (B, T, V) and the loss on targets (B, T).

        memory: cross_memory(src) computed before (generation passes it, so the encoder runs once).
        """
        memory_kv, source_mask, source_lengths = memory if memory is not None else self.cross_memory(src, pad_lengths)
        B, T = tgt.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"target of {start + T} tokens is longer than the context "
                             f"(block_size={self.config.block_size})")
        positions = torch.arange(start, start + T, device=tgt.device)                   # (T,)
        x = self.tok_emb(tgt)
        if self.config.position == "learned":
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope, cross_rope = self.rope_at(positions), self.rope_at(source_lengths.view(B, 1) + positions)
        for block, kv in zip(self.blocks, memory_kv):
            x = block(x, rope, kv_cache, (kv, source_mask), cross_rope)
        if kv_cache is not None:
            kv_cache.pos += T
        if last_only:
            x = x[:, -1:, :]
        return self.head_and_loss(x, targets, reduction)

    @torch.no_grad()
    def generate_stream(self, src: torch.Tensor, max_new_tokens: int, pad_lengths: Optional[torch.Tensor] = None,
                        use_cache: bool = True, **sampling) -> Iterator[torch.Tensor]:
        """Yield new decoder tokens (B,) one step at a time for the source src (B, S).

        The encoder runs once; the decoder starts from decoder_start_id and, with the
        cache, processes one new token per step. Sampling options as for GPT.generate_stream.
        """
        B = src.shape[0]
        memory = self.cross_memory(src, pad_lengths)
        start = torch.full((B, 1), self.config.decoder_start_id, dtype=src.dtype, device=src.device)
        max_new_tokens = min(max_new_tokens, self.config.block_size - 1)
        cache = self.new_kv_cache(B, 1 + max_new_tokens) if use_cache else None

        def next_logits(decoded, step_input):
            logits, _ = self(src, step_input if use_cache else decoded, kv_cache=cache, memory=memory, last_only=True)
            return logits[:, -1, :]                                                  # (B, V)
        # the repetition penalty looks at the answer only, not at the start token (as in HF)
        yield from decode_tokens(next_logits, start, max_new_tokens, self.config.vocab_size,
                                 seen_pad_lengths=torch.ones(B, dtype=torch.long, device=src.device), **sampling)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Source (B, S) -> the generated decoder tokens (B, n) (the source is not repeated)."""
        new = list(self.generate_stream(src, max_new_tokens, **kwargs))
        return torch.stack(new, dim=1) if new else src.new_zeros((src.shape[0], 0))


def build_model(config: ModelConfig) -> GPT:
    """The network a config describes: decoder-only GPT, or Seq2Seq when n_encoder_layer > 0."""
    return Seq2Seq(config) if config.n_encoder_layer else GPT(config)


# ----------------------------------------------------------------------------------
# LoRA: low-rank adapters beside frozen linear layers (used by lora.py and inference.py)


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
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in target_modules):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
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
