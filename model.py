"""
model.py -- one decoder-only Transformer, two flavours, one config.

    flavour="gpt2"   learned positions, LayerNorm, GELU MLP, biases, tied embeddings
    flavour="llama"  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head),
                     optional q/k/v bias (Qwen2), no other biases

Read it top to bottom: the config, then the pieces of a block (norm, rotary positions,
attention with its KV cache, feed-forward), the block, and GPT (forward and generate):
that is the whole decoder-only model. Two optional variants follow, each fenced off and
switched on by the config: a Mixture-of-Experts feed-forward (n_experts > 0) and an
encoder-decoder model (n_encoder_layer > 0).

A checkpoint stores its config as a dict, so `build_model(ModelConfig.from_dict(cfg))`
rebuilds the exact network. This file imports nothing from the project: the network
knows no tokenizer, no file format, no stage. (The full sampler, with top-p, min-p,
penalties and batches of prompts, is engine.py's; the LoRA layer is lora.py's.)

Shapes in comments: B batch, T time (tokens), C n_embd, H heads, Hkv key/value
heads, D head_dim = C // H, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (prompt tokens, padding)

FLAVOURS = {
    # flavour -> defaults for every switch the flavour decides
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True, tie_embeddings=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, tie_embeddings=True),
}


def option(default, help: str):
    """A config field with its --help text: pretrain.py offers every such field as a flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = 4096               # set from the tokenizer
    block_size: int = option(256, "context length: the most tokens the model sees at once")
    n_layer: int = option(4, "Transformer blocks")
    n_head: int = option(4, "attention heads")
    n_embd: int = option(192, "embedding width C")
    n_kv_head: Optional[int] = option(None, "key/value heads for grouped-query attention (default: n_head)")
    flavour: str = option("llama", "gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU); "
                                   "fills the switches below that are not given")
    position: Optional[str] = option(None, "learned | rope")
    norm: Optional[str] = option(None, "layernorm | rmsnorm")
    mlp: Optional[str] = option(None, "gelu | swiglu")
    bias: Optional[bool] = option(None, "biases in linear layers and LayerNorm")
    qkv_bias: Optional[bool] = option(None, "biases on q, k, v only (Qwen2 has them, Llama not)")
    tie_embeddings: Optional[bool] = option(None, "the output head shares the token embedding matrix")
    ffn_hidden: Optional[int] = option(None, "feed-forward width (default: 4C for gelu, about 8C/3 for swiglu)")
    rope_theta: float = option(10000.0, "RoPE base: pair i of a head turns by pos * theta^(-2i/D)")
    norm_eps: float = option(1e-5, "epsilon of the norms")
    dropout: float = option(0.0, "dropout probability")
    # Mixture-of-Experts feed-forward (n_experts = 0: the dense feed-forward above)
    n_experts: int = option(0, "routed experts per block (0 = a dense feed-forward)")
    top_k: int = option(2, "experts each token is sent to")
    n_shared_experts: int = option(0, "experts every token always goes through (DeepSeek-style)")
    expert_hidden: Optional[int] = option(None, "width of one expert (default: ffn_hidden / (top_k + shared), "
                                                "equal active parameters)")
    aux_loss_coef: float = option(0.01, "weight of the load-balancing loss added to the training loss")
    capacity_factor: float = option(0.0, "an expert takes at most this x its fair share of tokens, the rest "
                                         "are dropped (0 = no limit)")
    # encoder-decoder: n_encoder_layer > 0 adds an encoder of that many blocks before the n_layer decoder blocks
    n_encoder_layer: int = option(0, "> 0: an encoder-decoder model with this many encoder blocks "
                                     "(and n_layer decoder blocks); 0 = decoder-only")
    decoder_start_id: int = 0            # the token the decoder starts from (set from the tokenizer: <|endoftext|>)

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
        rules = [(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                  f"pick n_embd a multiple of n_head"),
                 (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head="
                  f"{self.n_kv_head}: each key/value head must serve the same number of query heads"),
                 (self.n_encoder_layer >= 0, f"n_encoder_layer must be >= 0 (0 = decoder-only), got {self.n_encoder_layer}"),
                 (self.n_experts >= 0 and self.n_shared_experts >= 0, "n_experts and n_shared_experts must be >= 0"),
                 (not self.n_experts or 1 <= self.top_k <= self.n_experts,
                  f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}: each token picks top_k experts"),
                 (self.capacity_factor >= 0, f"capacity_factor must be >= 0 (0 = no limit), got {self.capacity_factor}"),
                 (self.position != "rope" or self.head_dim % 2 == 0,
                  f"RoPE needs an even head_dim, got {self.head_dim}: change n_embd or n_head")]
        rules += [(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r} is not one of {allowed}")
                  for name, allowed in (("position", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                                        ("mlp", ("gelu", "swiglu")))]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)

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
# The pieces of a block


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
    an attn_mask says otherwise.  y = softmax(q k^T / sqrt(D)) v, per head."""

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
        self.dropout_p = config.dropout                # a probability: attention dropout happens inside the kernel

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None):
        """attn_mask (B, 1, T, S) bool, True = may attend: given for left-padded batches
        (see padded_attention_mask), or (B, 1, 1, S) from an encoder (padding only);
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
        p_drop = self.dropout_p if self.training else 0.0     # training never uses a KV cache
        if attn_mask is not None:
            # left-padded batch: causal, and no query ever sees a padding key (an encoder
            # passes a padding-only mask: bidirectional)
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


def padded_attention_mask(pad_lengths: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, start+T) bool: query start+i of row b may see key j if j <= start+i (causal)
    and j >= pad_lengths[b] (not padding). A padding query sees only itself, so no row of
    the mask is empty (a softmax over nothing would be NaN)."""
    q_pos = torch.arange(start, start + T, device=pad_lengths.device).view(1, T, 1)   # (1, T, 1)
    k_pos = torch.arange(start + T, device=pad_lengths.device).view(1, 1, start + T)  # (1, 1, S)
    pad = pad_lengths.view(-1, 1, 1)                                                  # (B, 1, 1)
    mask = (k_pos <= q_pos) & ((k_pos >= pad) | (k_pos == q_pos))                   # (B, T, S)
    return mask.unsqueeze(1)


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


# ----------------------------------------------------------------------------------
# The block and the model


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        # the one place a block's feed-forward is chosen: dense, or a Mixture of Experts (below)
        self.ffn = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, attn_mask=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv_cache, attn_mask))
        x = x + self.ffn(self.ffn_norm(x))
        return x


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
            for moe in moe_layers(self):
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                n -= (moe.n_experts - moe.top_k) * per_expert
        return n

    def summary(self) -> str:
        """A one-line description of the architecture."""
        c = self.config
        kind = f"Seq2Seq[{c.flavour}] {c.n_encoder_layer} encoder + {c.n_layer} decoder layers (cross-attention)" \
            if c.n_encoder_layer else f"GPT[{c.flavour}] {c.n_layer} layers"
        attn = f"{c.n_head} heads" + (f" / {c.n_kv_head} kv heads (GQA)" if c.n_kv_head != c.n_head else "")
        ffn = f"{c.mlp} ffn {c.ffn_hidden}" if not c.n_experts else (
            f"MoE: top {c.top_k} of {c.n_experts} {c.mlp} experts" + f" + {c.n_shared_experts} shared" * bool(c.n_shared_experts)
            + f" of width {c.expert_hidden} ({self.num_params(active=True) / 1e6:.2f}M params active per token)")
        return (f"{kind} x {c.n_embd} wide, {self.num_params() / 1e6:.2f}M params "
                f"({self.num_params(non_embedding=True) / 1e6:.2f}M non-embedding): {attn}, head_dim {c.head_dim}, "
                f"{c.position} positions, {c.norm}, {ffn}, context {c.block_size}, vocab {c.vocab_size}"
                f"{', tied embeddings' if c.tie_embeddings else ''}")

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, reduction: str = "mean",
                pad_lengths: Optional[torch.Tensor] = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, V), None); with targets (B, T): (None, loss).

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
        """Final norm and output head: x (B, T, C) -> (logits (B, T, V), None); given targets (B, T),
        (None, the cross-entropy): training needs only the loss."""
        if targets is None:
            return self.lm_head(self.final_norm(x)), None
        scored = targets != IGNORE_INDEX                                 # (B, T)
        if not torch.compiler.is_compiling() and not scored.all():
            # only the positions that count go through the head (its V-wide matmul is costly)
            x, targets = x[scored], targets[scored]                      # (N, C), (N,)
        logits = self.lm_head(self.final_norm(x))                        # (B, T, V) or (N, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        if reduction == "none":                                          # per position (B, T), 0 where ignored
            loss = torch.zeros(scored.shape, dtype=loss.dtype, device=loss.device).masked_scatter(scored, loss) \
                if targets.dim() == 1 else loss.view(scored.shape)
        elif self.training and self.config.n_experts:
            loss = loss + self.config.aux_loss_coef * moe_aux_loss(self)   # keep the experts evenly loaded
        return None, loss

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue the prompt idx (B, T) by max_new_tokens tokens -> (B, T + n).

        The prompt goes through the model once (prefill), filling the KV cache; after that each
        step feeds only the newest token, whose attention reads the cached keys and values of
        everything before it. temperature 0 = greedy; top_k samples among the k likeliest tokens.
        (engine.py has the full sampler: top-p, min-p, penalties, stop tokens, batches of prompts.)
        """
        B, T = idx.shape
        if T >= self.config.block_size:
            raise ValueError(f"prompt of {T} tokens does not fit the context of {self.config.block_size} tokens")
        max_new_tokens = min(max_new_tokens, self.config.block_size - T)
        cache = self.new_kv_cache(B, T + max_new_tokens)
        step_input = idx                                                 # the whole prompt first
        for _ in range(max_new_tokens):
            logits, _ = self(step_input, kv_cache=cache, last_only=True)
            step_input = sample(logits[:, -1, :], temperature, top_k, generator).unsqueeze(1)   # (B, 1)
            idx = torch.cat([idx, step_input], dim=1)
        return idx


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k likeliest tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


# ==================================================================================
# Optional: Mixture of Experts (ModelConfig.n_experts > 0)
# ==================================================================================


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
        # of the last forward pass: the balance loss (part of the training loss), and for the
        # training log, the routed slots per expert (E,) and how many went over capacity
        self.aux_loss, self.load, self.dropped = torch.zeros(()), torch.zeros(config.n_experts), 0

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
        self.load, self.dropped = counts.detach(), dropped
        return out.view(B, T, C)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Mean load-balancing loss of the last forward pass over the MoE blocks (0 for a dense model)."""
    layers = moe_layers(model)
    return sum(m.aux_loss for m in layers) / len(layers) if layers else torch.zeros(())


# ==================================================================================
# Optional: encoder-decoder (ModelConfig.n_encoder_layer > 0): the same blocks, plus an
# encoder that reads the whole source, and cross-attention from the decoder to it
# ==================================================================================


@dataclass
class EncodedSource:
    """What every decoder step needs of the source, computed once per source by Seq2Seq.encode_source."""
    cross_kv: list            # per decoder block: the source's keys and values (B, Hkv, S, D) each
    mask: torch.Tensor        # (B, 1, 1, S) bool, True = a real source token (not padding)
    lengths: torch.Tensor     # (B,) real source tokens per row


class CrossAttention(Attention):
    """The decoder's queries attend to the encoded source: q from x, k and v from the source.

    No causal mask (the whole source is known); padding in the source is masked out.
    With RoPE, the keys are rotated by their source positions and the queries as if the
    answer came right after the source (position source_length + t), so cross-attention
    sees the same relative distances as a decoder-only model attending to its prompt.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config, layer_idx=-1)       # the same projections; no KV cache of its own

    def source_kv(self, encoded: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """encoded source (B, S, C) -> keys and values (B, Hkv, S, D), computed once per source."""
        B, S, _ = encoded.shape
        k = self.k_proj(encoded).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, S, D)
        v = self.v_proj(encoded).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def forward(self, x, source_kv, source_mask, rope=None):
        """x (B, T, C); source_mask (B, 1, 1, S) bool, True = a real source token."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)          # (B, H, T, D)
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v = source_kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask, enable_gqa=self.n_kv_head != self.n_head,
                                           dropout_p=self.dropout_p if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderBlock(Block):
    """A decoder-only block with cross-attention between self-attention and the feed-forward:

        x + self_attn(norm(x))  ->  x + cross_attn(norm(x), source)  ->  x + ffn(norm(x))
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.cross_norm = make_norm(config)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, rope=None, kv_cache=None, source_kv=None, source_mask=None, cross_rope=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv_cache))
        x = x + self.resid_dropout(self.cross_attn(self.cross_norm(x), source_kv, source_mask, cross_rope))
        x = x + self.ffn(self.ffn_norm(x))
        return x


class Seq2Seq(GPT):
    """Encoder-decoder Transformer, e.g. for a dialogue model:

        source (B, S) -> encoder: n_encoder_layer blocks, every token sees every other -> encoded (B, S, C)
        target (B, T) -> decoder: n_layer blocks, causal self-attention + cross-attention to
                         the encoded source + feed-forward -> logits (B, T, V)

    The decoder reads [decoder_start_id, y1, ..., y_{T-1}] and learns to predict [y1, ..., yT].
    One token embedding serves the encoder, the decoder and (tied) the output head. Weight
    init, parameter counts and the KV cache (decoder self-attention only) come from GPT.
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
        """src (B, S), left-padded by pad_lengths (B,) -> encoded (B, S, C), source_mask (B, 1, 1, S),
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

    def encode_source(self, src: torch.Tensor, pad_lengths: Optional[torch.Tensor] = None) -> EncodedSource:
        """Run the encoder once, then compute what every decoder step needs: each block's
        cross-attention keys and values, the source mask and the source lengths."""
        encoded, source_mask, positions = self.encode(src, pad_lengths)
        rope = self.rope_at(positions)
        kv = [block.cross_attn.source_kv(encoded, rope) for block in self.blocks]
        return EncodedSource(kv, source_mask, source_mask.sum(dim=-1).view(-1))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, pad_lengths: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                source: Optional[EncodedSource] = None, reduction: str = "mean", last_only: bool = False):
        """src (B, S) source ids (left-padded by pad_lengths), tgt (B, T) decoder inputs ->
        (logits (B, T, V), None), or with targets (B, T): (None, loss), as GPT.forward.

        source: encode_source(src) computed before (generation passes it, so the encoder runs once).
        """
        source = source if source is not None else self.encode_source(src, pad_lengths)
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
        rope, cross_rope = self.rope_at(positions), self.rope_at(source.lengths.view(B, 1) + positions)
        for block, kv in zip(self.blocks, source.cross_kv):
            x = block(x, rope, kv_cache, kv, source.mask, cross_rope)
        if kv_cache is not None:
            kv_cache.pos += T
        if last_only:
            x = x[:, -1:, :]
        return self.head_and_loss(x, targets, reduction)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 pad_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Source (B, S) -> the decoder's tokens (B, n) (the source is not repeated).

        The encoder runs once; the decoder starts from decoder_start_id and, with its KV cache,
        processes one new token per step.
        """
        B = src.shape[0]
        source = self.encode_source(src, pad_lengths)
        max_new_tokens = min(max_new_tokens, self.config.block_size - 1)
        cache = self.new_kv_cache(B, 1 + max_new_tokens)
        step_input = torch.full((B, 1), self.config.decoder_start_id, dtype=src.dtype, device=src.device)
        new = []
        for _ in range(max_new_tokens):
            logits, _ = self(src, step_input, kv_cache=cache, source=source, last_only=True)
            step_input = sample(logits[:, -1, :], temperature, top_k, generator).unsqueeze(1)   # (B, 1)
            new.append(step_input)
        return torch.cat(new, dim=1) if new else src.new_zeros((B, 0))


def build_model(config: ModelConfig) -> GPT:
    """The network a config describes: decoder-only GPT, or Seq2Seq when n_encoder_layer > 0."""
    return Seq2Seq(config) if config.n_encoder_layer else GPT(config)
