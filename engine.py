"""
engine.py -- the generation engine behind inference.py (REPL, one-shot, jsonl) and serve.py (HTTP API).

    text or messages --(chat template)--> ids --(prefill, then one token per step
        with the KV cache; sampling)--> token ids --(UTF-8 decoder, stop strings)-->
        pieces of text, streamed as they are ready

An `Engine` holds a model, its tokenizer and whether it chats. It turns prompts into
ids (refusing, in one line, what does not fit the context) and streams answers for a
batch of prompts at once: prompts of different lengths are left-padded, and every row
keeps its own token limit, stop strings and UTF-8 decoder; the batch ends when every
row is done.

`SamplingParams` are the knobs of one answer (temperature, top-k, top-p, min-p,
penalties, length, stop strings, seed), checked in one place for the command line,
the REPL's /set and the server alike. The sampler itself (`sample_next_token`,
`apply_penalties`) and the decoding loop (`decode_tokens`) are here too: model.py keeps
only a short `generate` with temperature and top-k, the version to read first.

Other model types: `next_logits_fn` is the one place that runs the model for the
decoding loop and `Engine.room` the one place that says how many tokens fit after a
prompt. The encoder-decoder model (model.Seq2Seq) plugs in there: its encoder reads
the prompt once, and its decoder yields the answer.
"""

from __future__ import annotations

import codecs
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from flags import arg
from runtime import resolve_device
from tokenizer import load_tokenizer
from tokenizer.chat import render_chat
from weight.checkpoint import check_tokenizer_matches, load_model

CHAT_STAGES = ("sft", "dpo", "lora", "lora_merged")     # checkpoints that expect the chat template
MAKE_COMMANDS = {"pretrain": "python pretrain.py", "sft": "python full_sft.py", "dpo": "python dpo.py",
                 "lora": "python lora.py", "lora_merged": "python lora.py --merge"}   # folder name -> maker


# ----------------------------------------------------------------------------------
# Sampling settings


@dataclass
class SamplingParams:
    """How one answer is sampled. Defaults suit small models: a little randomness, no long tail."""
    temperature: float = arg(0.7, "0 = greedy (always the most likely token); higher = more random")
    top_k: int = arg(40, "sample only among the k most likely tokens (0 = off)")
    top_p: float = arg(0.9, "sample only among the most likely tokens whose probabilities add up to "
                            "top_p (1 = off); must be in (0, 1]")
    min_p: float = arg(0.05, "drop tokens less likely than min_p x the most likely one (0 = off)")
    repetition_penalty: float = arg(1.1, "divide the logit of every token already in the text by this "
                                         "(1 = off; >1 discourages loops, which small models love)")
    frequency_penalty: float = arg(0.0, "subtract this x (times the token was generated) from its logit (OpenAI style)")
    presence_penalty: float = arg(0.0, "subtract this from the logit of every token generated at least once")
    max_new_tokens: int = arg(200, "longest answer in tokens (also ends at the context's end)")
    stop: tuple = arg((), "stop strings: the answer ends before the first one (\\n is a newline)", nargs="*", type=str)
    seed: int = arg(-1, "random seed (-1 = different every run)")

    def validate(self, flag_prefix: str = "") -> "SamplingParams":
        """Raise ValueError (one line, naming the setting) for values that cannot work."""
        checks = [("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2] (0 = off)"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2] (0 = off)"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "at least 1")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{flag_prefix}{name} must be {rule}, got {getattr(self, name)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"{flag_prefix}stop strings must be non-empty text, got {list(self.stop)}")
        return self

    def decode_kwargs(self) -> dict:
        """The keyword arguments of decode_tokens."""
        return dict(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p,
                    min_p=self.min_p or None, repetition_penalty=self.repetition_penalty,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, config) -> "SamplingParams":
        """The sampling flags of a command (InferenceConfig, ServeConfig), checked: stop strings
        typed as '\\n' become newlines; a value that cannot work stops with one line naming the flag."""
        params = cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
        return params.replace(stop=tuple(unescape(s) for s in params.stop)).validate(flag_prefix="--")

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "SamplingParams":
        """Always the most likely token, no penalties: reproducible (evaluation, tests)."""
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                   max_new_tokens=max_new_tokens)


def unescape(text: str) -> str:
    r"""'\n' and '\t' typed on a command line -> newline and tab (other text unchanged)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@dataclass
class LoadConfig(SamplingParams):
    """Which model to load and how: shared by inference.py and serve.py (plus the sampling defaults)."""
    ckpt: str = arg("weight/pretrain", "checkpoint folder (pretrain.py, full_sft.py, dpo.py, lora.py --merge)")
    init_from: str = arg("", "the same as --ckpt (the name the training scripts use)")
    lora: str = arg("", "LoRA adapter folder (made by lora.py), applied on top of the base it was trained on")
    tokenizer: str = arg("", "tokenizer file ('' = the checkpoint's own tokenizer.json)")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = arg("auto", "weights and KV cache: auto (bfloat16 on CUDA, else float32) | float32 | bfloat16",
                     choices=["auto", "float32", "bfloat16"])
    chat: str = arg("auto", "chat template and history: auto (on for SFT/LoRA/DPO checkpoints and imported "
                            "models with a chat template), on, off",
                    choices=["auto", "on", "off"])


# ----------------------------------------------------------------------------------
# The decoding loop and the sampler


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> idx (B, T_max) padded on the left with pad_id,
    and pad_lengths (B,). Left, so that every row's next token lands in the same column."""
    longest = max(len(s) for s in sequences)
    idx = torch.tensor([[pad_id] * (longest - len(s)) + list(s) for s in sequences], device=device)
    pad_lengths = torch.tensor([longest - len(s) for s in sequences], device=device)
    return idx, pad_lengths


def next_logits_fn(model, idx: torch.Tensor, pad_lengths: Optional[torch.Tensor], max_new_tokens: int,
                   use_cache: bool = True):
    """How the decoding loop runs the model on prompts idx (B, T), left-padded by pad_lengths (B,).

    Returns (next_logits, start, unseen_lengths (B,)): next_logits(sequence, step_input) -> logits
    (B, V) of the next token, given everything so far (B, t) and what is new since the last
    call (the whole start first, then one token); start (B, n) is what decoding begins from.
    With the cache the model sees only the new tokens (prefill, then one per step); without
    it the whole sequence again every step (slow; for comparison).
    A decoder-only model starts from the prompt itself. An encoder-decoder model reads the
    prompt once with its encoder and starts decoding from its start token, which does not
    count as seen for the repetition penalty (unseen_lengths 1).
    """
    B = idx.shape[0]
    if pad_lengths is not None and not bool(pad_lengths.any()):
        pad_lengths = None                           # nothing padded: the plain causal path
    if getattr(model.config, "n_encoder_layer", 0):
        with torch.inference_mode():
            source = model.encode_source(idx, pad_lengths)               # the encoder runs once
        start = torch.full((B, 1), model.config.decoder_start_id, dtype=idx.dtype, device=idx.device)
        cache = model.new_kv_cache(B, 1 + max_new_tokens) if use_cache else None

        def next_logits(decoded, step_input):
            logits, _ = model(idx, step_input if use_cache else decoded, kv_cache=cache, source=source, last_only=True)
            return logits[:, -1, :]                                      # (B, V)
        return next_logits, start, torch.ones(B, dtype=torch.long, device=idx.device)

    cache = model.new_kv_cache(B, idx.shape[1] + max_new_tokens) if use_cache else None

    def next_logits(sequence, step_input):
        if use_cache:                                # only the new tokens: the cache holds the rest
            logits, _ = model(step_input, kv_cache=cache, pad_lengths=pad_lengths, last_only=True)
        else:
            logits, _ = model(sequence, pad_lengths=pad_lengths, last_only=True)
        return logits[:, -1, :]                                          # (B, V)
    return next_logits, idx, pad_lengths


def generate(model, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
             pad_lengths: Optional[torch.Tensor] = None, **sampling) -> torch.Tensor:
    """Token ids in, token ids out, with the full sampler (the engine's own path, below the text).

    Prompts idx (B, T), left-padded by pad_lengths (B,) -> prompt + new tokens (B, T + n) for a
    decoder-only model, the decoder's tokens (B, n) for an encoder-decoder one. sampling: the
    keyword arguments of decode_tokens (temperature, top_k, ..., stop_tokens, generator). After a
    row's stop token its later tokens mean nothing. (model.generate is the short version.)
    """
    seq2seq = bool(getattr(model.config, "n_encoder_layer", 0))
    room = model.config.block_size - (1 if seq2seq else idx.shape[1])
    if room < 1:
        raise ValueError(f"prompt of {idx.shape[1]} tokens does not fit the context of "
                         f"{model.config.block_size} tokens: shorten it")
    max_new_tokens = min(max_new_tokens, room)
    next_logits, start, unseen_lengths = next_logits_fn(model, idx, pad_lengths, max_new_tokens, use_cache)
    new = [t.unsqueeze(1) for t in decode_tokens(next_logits, start, max_new_tokens, model.config.vocab_size,
                                                 unseen_lengths=unseen_lengths, **sampling)]
    if seq2seq:
        return torch.cat(new, dim=1) if new else idx.new_zeros((idx.shape[0], 0))
    return torch.cat([idx] + new, dim=1)


@torch.inference_mode()   # like no_grad, and less work per op; the yielded tokens are inference tensors
def decode_tokens(next_logits: Callable, start: torch.Tensor, max_new_tokens: int, vocab_size: int,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, stop_tokens: tuple = (), generator: Optional[torch.Generator] = None,
                  unseen_lengths: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """The sampling loop: yield one new token per row (B,) per step.

    next_logits(sequence, step_input) -> logits (B, V) for the next position (see
    next_logits_fn). The tokens of `start` count as already seen for the repetition penalty,
    except the first unseen_lengths (B,) of each row: left padding, or an encoder-decoder's
    start token. A row is done at its first stop token (its later
    tokens mean nothing); the loop ends when every row is done or after max_new_tokens.
    """
    B, T = start.shape
    penalize = repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
    if penalize:
        real = torch.ones_like(start, dtype=torch.float32)           # (B, T): 1 = a real prompt token
        if unseen_lengths is not None:
            real = (torch.arange(T, device=start.device) >= unseen_lengths.view(B, 1)).float()
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
# Token ids -> text, one row at a time


class TextStream:
    """Token ids in, printable text out, for one answer.

    Two things are held back until they are settled: bytes of a UTF-8 character split
    over several tokens (common in Chinese: one character is 3 bytes), and text that
    could be the beginning of a stop string. When a stop string appears, the text ends
    just before it and `stopped` is set.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(stop)
        self.pending = ""          # decoded, not yet released: might start a stop string
        self.text = ""             # everything released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show ('' if none, and after a stop)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits), drop_rest=True)
        # keep back the longest tail of pending that is the start of some stop string
        keep = max((n for s in self.stop for n in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:n])), default=0)
        return self._release(len(self.pending) - keep)

    def finish(self) -> str:
        """The answer is over (stop token or length): release what was held back."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(len(self.pending))

    def _release(self, upto: int, drop_rest: bool = False) -> str:
        out, self.pending = self.pending[:upto], ("" if drop_rest else self.pending[upto:])
        self.text += out
        return out


@dataclass
class Delta:
    """A piece of one row's answer. The last delta of a row has finish_reason set:
    "stop" (a stop token or stop string) or "length" (max_new_tokens or the context's end)."""
    row: int
    text: str
    tokens: int                          # tokens generated for this row so far
    finish_reason: Optional[str] = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Stats:
    """Timing of the last generation: prefill (time to first token), then decoding."""
    prompt_tokens: int = 0           # real tokens over all rows (padding not counted)
    new_tokens: int = 0              # tokens generated over all rows
    first_token_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"[{self.new_tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s; "
                f"prompt {self.prompt_tokens} tokens, first token after {self.first_token_seconds * 1000:.0f} ms]")


# ----------------------------------------------------------------------------------
# The engine


class Engine:
    """A model, its tokenizer, and whether it is a chat model; generates text for prompts."""

    def __init__(self, model, tokenizer, chat: bool, name: str = "model", stop_tokens: Sequence[int] | None = None):
        self.model, self.tokenizer, self.chat, self.name = model.eval(), tokenizer, chat, name
        self.device = next(model.parameters()).device
        self.stop_tokens = tuple(stop_tokens) if stop_tokens is not None else end_tokens(tokenizer)
        self.stats = Stats()

    @classmethod
    def load(cls, cfg: LoadConfig) -> "Engine":
        """Load a checkpoint (or a LoRA adapter on its base) and its tokenizer, as cfg says."""
        device = resolve_device(cfg.device)
        ckpt = cfg.init_from or cfg.ckpt
        model, tokenizer, ckpt_config, folder = load_model(
            ckpt, cfg.lora, device, make_hint=MAKE_COMMANDS.get(Path(ckpt).name, "python pretrain.py"))
        name = Path(cfg.lora).name if cfg.lora else Path(ckpt).resolve().name
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        model = model.to(getattr(torch, dtype))
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        check_tokenizer_matches(ckpt_config, tokenizer, folder)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but {ckpt} expects "
                             f"{model.config.vocab_size}: use the checkpoint's own tokenizer.json")
        chat = cfg.chat == "on" or (cfg.chat == "auto" and expects_chat_template(ckpt_config))
        if chat:
            _ = tokenizer.im_start_id     # a model with a chat template of its own refuses ChatML: at the start, in one line
        return cls(model, tokenizer, chat, name)

    @property
    def context(self) -> int:
        return self.model.config.block_size

    @property
    def seq2seq(self) -> bool:
        """An encoder-decoder model: the prompt goes to the encoder, the answer has a context of its own."""
        return bool(getattr(self.model.config, "n_encoder_layer", 0))

    def room(self, prompt_length: int) -> int:
        """How many new tokens fit after a prompt of this length."""
        if self.seq2seq:   # the decoder starts with one start token; the source must fit the encoder
            return self.context - 1 if prompt_length <= self.context else 0
        return self.context - prompt_length

    # --- prompts -> ids --------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """A text to continue -> ids; refused in one line if it leaves no room to generate."""
        ids = self.tokenizer.encode_ordinary(text) or [self.tokenizer.eot_id]
        if self.room(len(ids)) < 1:
            raise ValueError(f"prompt is {len(ids)} tokens, the model's context is {self.context}: shorten it")
        return ids

    def chat_ids(self, messages: list[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """A conversation -> ids ending with the assistant's header, ready for the answer.
        tools: JSON schemas the model may call (offered in the system prompt, tokenizer/chat.py)."""
        ids, _ = render_chat(messages, self.tokenizer, add_generation_prompt=True, where="messages", tools=tools)
        if self.room(len(ids)) < 1:
            raise ValueError(f"conversation is {len(ids)} tokens with the chat template, the model's context is "
                             f"{self.context}: shorten it or start a new conversation")
        return ids

    def prompt_ids(self, messages: list[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """ids for a conversation: the template for a chat model; a text model continues the last message."""
        return self.chat_ids(messages, tools) if self.chat else self.text_ids(messages[-1]["content"])

    def generator(self, seed: int) -> torch.Generator:
        """A random number generator for sampling: seeded (reproducible) or not (seed < 0)."""
        rng = torch.Generator(device=self.device)
        return rng.manual_seed(seed) if seed >= 0 else rng.manual_seed(time.time_ns() % 2**63)

    # --- generation ------------------------------------------------------------

    def stream(self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None = None,
               stop: list[Sequence[str]] | None = None, generator: torch.Generator | None = None,
               cancelled: Callable[[int], bool] = lambda row: False, use_cache: bool = True) -> Iterator[Delta]:
        """Stream the answers to a batch of prompts (token id lists) as Deltas.

        params gives the sampling (shared by the batch); max_new_tokens and stop, one per row,
        default to params.max_new_tokens and params.stop. cancelled(row) -> True ends a row
        early (a client that went away). Timing goes to self.stats.
        """
        n = len(prompts)
        limits = [min(m, self.room(len(p))) for m, p in zip(max_new_tokens or [params.max_new_tokens] * n, prompts)]
        rows = [TextStream(self.tokenizer, s) for s in (stop or [params.stop] * n)]
        counts, done = [0] * n, [False] * n
        idx, pad_lengths = left_pad(prompts, self.tokenizer.eot_id, self.device)      # (B, T), (B,)
        self.stats = Stats(prompt_tokens=sum(len(p) for p in prompts))
        start = time.perf_counter()
        next_logits, begin, unseen_lengths = next_logits_fn(self.model, idx, pad_lengths, max(limits), use_cache)
        tokens = decode_tokens(next_logits, begin, max(limits), self.model.config.vocab_size,
                               stop_tokens=self.stop_tokens, unseen_lengths=unseen_lengths,
                               generator=generator if generator is not None else self.generator(params.seed),
                               **params.decode_kwargs())
        try:
            for step, next_tokens in enumerate(tokens):
                if step == 0:
                    self.stats.first_token_seconds = time.perf_counter() - start
                for row, token in enumerate(next_tokens.tolist()):
                    if done[row]:
                        continue
                    if token in self.stop_tokens or cancelled(row):
                        done[row] = True
                        yield Delta(row, rows[row].finish(), counts[row], "stop")
                        continue
                    counts[row] += 1
                    self.stats.new_tokens += 1
                    text = rows[row].push(token)
                    if rows[row].stopped or counts[row] >= limits[row]:
                        done[row] = True
                        text += rows[row].finish()
                        yield Delta(row, text, counts[row], "stop" if rows[row].stopped else "length")
                    elif text:
                        yield Delta(row, text, counts[row])
                if all(done):
                    break
        finally:
            tokens.close()
            self.stats.seconds = time.perf_counter() - start
        for row in range(n):          # the model reached the end of the context
            if not done[row]:
                yield Delta(row, rows[row].finish(), counts[row], "length")

    def complete(self, prompts: list[list[int]], params: SamplingParams, batch_size: int = 16) -> list[Completion]:
        """Whole answers for many prompts, batched (similar lengths together, left-padded)."""
        budgets = [min(params.max_new_tokens, self.room(len(p))) for p in prompts]
        results: list[Optional[Completion]] = [None] * len(prompts)
        # left padding shares one context between prompt and answer; an encoder-decoder's answer has its own
        limit = self.context if not self.seq2seq else float("inf")
        for batch in pack_batches([len(p) for p in prompts], budgets, limit, batch_size):
            texts = [""] * len(batch)
            for d in self.stream([prompts[i] for i in batch], params, [budgets[i] for i in batch]):
                texts[d.row] += d.text
                if d.finish_reason:
                    i = batch[d.row]
                    results[i] = Completion(texts[d.row], d.finish_reason, len(prompts[i]), d.tokens)
        return results


def expects_chat_template(ckpt_config: dict) -> bool:
    """Chat checkpoints: the project's SFT/LoRA/DPO stages, and imported models that ship a chat template."""
    imported = {"hf_import": "hf", "gguf_import": "gguf"}.get(ckpt_config.get("stage"))
    imported_chat = imported and ckpt_config.get(imported, {}).get("chat_template")
    return ckpt_config.get("stage") in CHAT_STAGES or bool(imported_chat)


def end_tokens(tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: <|endoftext|> and, where the vocabulary has it, <|im_end|>."""
    ids = []
    for name in ("eot_id", "im_end_id"):
        try:
            ids.append(getattr(tokenizer, name))
        except ValueError:          # e.g. GPT-2's own vocabulary has no <|im_end|>
            pass
    return tuple(ids)


def pack_batches(lengths: list[int], budgets: list[int], context: int, batch_size: int) -> list[list[int]]:
    """Group prompt indices into batches of at most batch_size, sorted by length (little padding).

    A left-padded batch is as long as its longest prompt, so a row may lose room at the end
    of the context: a prompt joins a batch only if longest prompt + largest budget still fits.
    """
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        trial = current + [i]
        fits = max(lengths[j] for j in trial) + max(budgets[j] for j in trial) <= context
        if current and (len(trial) > batch_size or not fits):
            batches.append(current)
            trial = [i]
        current = trial
    return batches + ([current] if current else [])
