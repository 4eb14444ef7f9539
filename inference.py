"""
inference.py -- talk to a trained model.

    python inference.py --prompt "ROMEO:"        # continue a text once, streamed
    python inference.py                          # a REPL: each line you type is continued
    python inference.py --ckpt weight/pretrain --temperature 0.7 --top_k 40 --top_p 0.9

Generation: the prompt goes through the model once (prefill, filling the KV cache),
then one token per step, each step reusing the cached keys and values.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass

import torch

from training import (arg, check_tokenizer_matches, load_checkpoint, load_checkpoint_tokenizer,
                      main_guard, parse_config, resolve_device)


@dataclass
class InferenceConfig:
    ckpt: str = arg("weight/pretrain", "checkpoint folder (made by pretrain.py)")
    tokenizer: str = arg("", "tokenizer file ('' = the checkpoint's own tokenizer.json)")
    prompt: str = arg("", "text to continue; empty opens the REPL")
    max_new_tokens: int = arg(200, "tokens to generate per answer")
    temperature: float = arg(0.8, "0 = greedy; higher = more random")
    top_k: int = arg(50, "sample only among the k most likely tokens (0 = off)")
    top_p: float = arg(0.95, "sample only among the smallest set of tokens with this much probability (1 = off)")
    seed: int = arg(-1, "random seed (-1 = different every run)")
    device: str = arg("auto", "auto | cpu | cuda | mps", choices=["auto", "cpu", "cuda", "mps"])
    kv_cache: bool = arg(True, "reuse keys/values of past tokens; --no-kv_cache recomputes the whole context each step (slow)")
    stats: bool = arg(False, "print tokens/s after each answer")


class Generator:
    """A model, its tokenizer and sampling settings; streams text for a prompt."""

    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model, self.ckpt_config = load_checkpoint(cfg.ckpt, self.device, make_hint="python pretrain.py")
        self.model.eval()
        if cfg.tokenizer:
            from tokenizer import Tokenizer
            self.tokenizer = Tokenizer.load(cfg.tokenizer)
        else:
            self.tokenizer = load_checkpoint_tokenizer(cfg.ckpt)
        check_tokenizer_matches(self.ckpt_config, self.tokenizer, cfg.ckpt)
        if self.tokenizer.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but {cfg.ckpt} expects "
                             f"{self.model.config.vocab_size}: use the checkpoint's own tokenizer.json")
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(cfg.seed if cfg.seed >= 0 else int(time.time_ns() % 2**31))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the prompt; refused in one line if it leaves no room to generate."""
        ids = self.tokenizer.encode_ordinary(prompt) or [self.tokenizer.eot_id]
        context = self.model.config.block_size
        if len(ids) >= context:
            raise ValueError(f"prompt is {len(ids)} tokens, the model's context is {context}: shorten it")
        return ids

    def stream(self, prompt: str):
        """Yield pieces of text as tokens arrive; a UTF-8 character split over two tokens
        (common in Chinese) is held back until complete, so nothing garbled is printed."""
        ids = self.prompt_ids(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        x = torch.tensor([ids], device=self.device)
        self.last_count, start = 0, time.perf_counter()
        for token in self.model.generate_stream(
                x, self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_k=self.cfg.top_k or None,
                top_p=self.cfg.top_p, stop_tokens=(self.tokenizer.eot_id,), use_cache=self.cfg.kv_cache,
                generator=self.rng):
            token_id = token.item()
            self.last_count += 1
            if token_id == self.tokenizer.eot_id:
                break
            text = decoder.decode(self.tokenizer.decode_bytes([token_id]))
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
        self.last_seconds = time.perf_counter() - start

    def print_answer(self, prompt: str, echo_prompt: bool = True):
        self.prompt_ids(prompt)                    # a too-long prompt fails before anything is printed
        if echo_prompt:
            print(prompt, end="", flush=True)
        for piece in self.stream(prompt):
            print(piece, end="", flush=True)
        print()
        if self.cfg.stats:
            print(f"[{self.last_count} tokens, {self.last_count / max(self.last_seconds, 1e-9):.1f} tokens/s]")


def repl(gen: Generator):
    print(f"{gen.model.summary()}\nType text to continue it; /exit or Ctrl-D quits.")
    try:
        import readline  # noqa: F401  (line editing and history where available)
    except ImportError:
        pass
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        try:
            gen.print_answer(line)
        except KeyboardInterrupt:
            print("\n[stopped]")
        except ValueError as e:
            print(f"error: {e}")


def main():
    cfg = parse_config(InferenceConfig, __doc__.split("\n\n")[0].strip())
    if cfg.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    gen = Generator(cfg)
    if cfg.prompt:
        gen.print_answer(cfg.prompt)
    else:
        repl(gen)


if __name__ == "__main__":
    main_guard(main)
