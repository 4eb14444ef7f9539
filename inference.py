"""
inference.py -- talk to a trained model.

    python inference.py --prompt "ROMEO:"        # continue a text once, streamed
    python inference.py                          # a REPL: each line you type is continued
    python inference.py --ckpt weight/pretrain --temperature 0.7 --top_k 40 --top_p 0.9
    python inference.py --ckpt weight/sft                 # chat: the template, multi-turn history
    python inference.py --ckpt weight/sft --system "Be brief." --prompt "Who are you?"
    python inference.py --lora weight/lora                # a LoRA adapter on top of its base model

Generation: the prompt goes through the model once (prefill, filling the KV cache),
then one token per step, each step reusing the cached keys and values.

Chat models (made by full_sft.py, lora.py, dpo.py) get the conversation rendered with the
chat template (tokenizer/chat.py) and answer until <|im_end|>; the REPL keeps the history,
and when it outgrows the context the oldest turns are dropped (the system prompt stays).
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass

import torch

from tokenizer.chat import render_chat
from training import (arg, check_tokenizer_matches, load_adapted_model, load_checkpoint, load_checkpoint_tokenizer,
                      main_guard, parse_config, resolve_device)

CHAT_STAGES = ("sft", "dpo", "lora", "lora_merged")     # checkpoints that expect the chat template


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
    chat: str = arg("auto", "chat template and history: auto (on for SFT/LoRA/DPO checkpoints), on, off",
                    choices=["auto", "on", "off"])
    system: str = arg("", "system prompt for chat mode")
    lora: str = arg("", "LoRA adapter folder (made by lora.py), applied on top of the base it was trained on")


class Generator:
    """A model, its tokenizer and sampling settings; streams text for a prompt."""

    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.lora:   # the adapter names its base checkpoint; the tokenizer is the base's
            self.model, self.ckpt_config = load_adapted_model(cfg.lora, self.device)
            ckpt_dir, self.ckpt_config["stage"] = self.ckpt_config["init_from"], "lora"
        else:
            self.model, self.ckpt_config = load_checkpoint(cfg.ckpt, self.device, make_hint="python pretrain.py")
            ckpt_dir = cfg.ckpt
        self.model.eval()
        if cfg.tokenizer:
            from tokenizer import Tokenizer
            self.tokenizer = Tokenizer.load(cfg.tokenizer)
        else:
            self.tokenizer = load_checkpoint_tokenizer(ckpt_dir)
        self.chat = cfg.chat == "on" or (cfg.chat == "auto" and self.ckpt_config.get("stage") in CHAT_STAGES)
        self.system, self.history = cfg.system, []
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

    def chat_ids(self, user_text: str) -> list[int]:
        """The conversation so far plus the new user turn, rendered and ready for the answer.

        If it does not fit (leaving room for an answer), the oldest turns are dropped; the
        system prompt always stays.
        """
        context = self.model.config.block_size
        room = min(self.cfg.max_new_tokens, context // 4)
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + \
                [{"role": "user", "content": user_text}]
            ids, _ = render_chat(messages, self.tokenizer, add_generation_prompt=True)
            if len(ids) + room <= context or not self.history:
                break
            self.history = self.history[2:]                       # forget the oldest user/assistant pair
            print("[history longer than the context: the oldest turn was dropped]")
        if len(ids) >= context:
            raise ValueError(f"message is {len(ids)} tokens with the chat template, the model's context is "
                             f"{context}: shorten it")
        return ids

    def stream(self, prompt: str, ids: list[int] | None = None):
        """Yield pieces of text as tokens arrive; a UTF-8 character split over two tokens
        (common in Chinese) is held back until complete, so nothing garbled is printed."""
        ids = ids if ids is not None else self.prompt_ids(prompt)
        stop = (self.tokenizer.eot_id, self.tokenizer.im_end_id)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        x = torch.tensor([ids], device=self.device)
        self.last_count, start = 0, time.perf_counter()
        for token in self.model.generate_stream(
                x, self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_k=self.cfg.top_k or None,
                top_p=self.cfg.top_p, stop_tokens=stop, use_cache=self.cfg.kv_cache,
                generator=self.rng):
            token_id = token.item()
            self.last_count += 1
            if token_id in stop:
                break
            text = decoder.decode(self.tokenizer.decode_bytes([token_id]))
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
        self.last_seconds = time.perf_counter() - start

    def print_answer(self, prompt: str, echo_prompt: bool = True):
        if self.chat:
            ids = self.chat_ids(prompt)            # a too-long message fails before anything is printed
            answer = ""
            for piece in self.stream(prompt, ids):
                answer += piece
                print(piece, end="", flush=True)
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        else:
            self.prompt_ids(prompt)                # a too-long prompt fails before anything is printed
            if echo_prompt:
                print(prompt, end="", flush=True)
            for piece in self.stream(prompt):
                print(piece, end="", flush=True)
        print()
        if self.cfg.stats:
            print(f"[{self.last_count} tokens, {self.last_count / max(self.last_seconds, 1e-9):.1f} tokens/s]")


def repl(gen: Generator):
    if gen.chat:
        print(f"{gen.model.summary()}\nChat: /reset forgets the conversation, /system TEXT sets the system "
              f"prompt, /exit or Ctrl-D quits.")
    else:
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
        if gen.chat and line.strip() == "/reset":
            gen.history = []
            print("[conversation reset]")
            continue
        if gen.chat and line.startswith("/system"):
            gen.system, gen.history = line[len("/system"):].strip(), []
            print(f"[system prompt: {gen.system!r}; conversation reset]")
            continue
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
