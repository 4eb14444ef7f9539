"""
Tokenizers of public models (GPT-2, Qwen2/Qwen2.5), read from their Hugging Face files and run by tiktoken.

Every byte-level BPE vocabulary, whatever file it comes in, is the same two things:
a split regex and a table {token bytes: id}, where a smaller id means an earlier merge.
That table is exactly tiktoken's `mergeable_ranks`, so tiktoken runs GPT-2's or Qwen's
vocabulary just as it runs ours. The files only spell the table differently:

    vocab.json + merges.txt   GPT-2's original pair: {"Ġhello": 23748, ...} and the merges in order, one
                              "Ġhel lo" per line. Bytes are spelled as printable characters (see
                              `byte_to_char`: the space 0x20 is "Ġ", newline 0x0A is "Ċ")
    tokenizer.json            the `tokenizers` library's one-file format: the same vocab and merges, plus
                              the split regex, a Unicode normalizer (Qwen2: NFC) and the added tokens
    NAME.tiktoken             tiktoken's own: one "base64(token bytes) id" per line (no regex, no specials)
    tokenizer_config.json     the added/special tokens and the chat template (Jinja; newer folders keep the
                              template in chat_template.jinja instead)

`PretrainedTokenizer` is a `Tokenizer` built from such a table instead of from our own
merges: same methods, same ids as the reference tokenizer, and its own save format
(one JSON file, tokens in base64) so a fine-tuned checkpoint carries it along.
`hf_tokenizer_files` writes any of our tokenizers back as tokenizer.json (+ config).

The project chats in one format, ChatML (tokenizer/chat.py). A model whose own template is
ChatML (Qwen2.5, SmolLM2) chats here exactly as its template says. A model whose template is
something else (Llama-3's headers) would be prompted wrongly in ChatML, so its tokenizer
refuses chat: asking it for <|im_start|>/<|im_end|> raises one line saying what to do instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
import tiktoken

from atomic import atomic_write_text

from .bpe import merges_to_vocab
from .tokenizer import Tokenizer, read_tokenizer_file

FORMAT = "workshop-ranks-v1"   # our save format for an imported vocabulary

# Split regexes (facts of the public tokenizers). GPT-2: contractions, letters, digits and
# symbols each with one optional leading space, then whitespace runs.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen2: case-insensitive contractions, letters with one optional leading non-letter,
# ONE digit at a time, symbols (+ trailing newlines), newlines, whitespace.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# which regex (and normalization) a tokenizer class of transformers uses, when no tokenizer.json says so
TOKENIZER_CLASSES = {"GPT2Tokenizer": (GPT2_PATTERN, None), "GPT2TokenizerFast": (GPT2_PATTERN, None),
                     "Qwen2Tokenizer": (QWEN2_PATTERN, "NFC"), "Qwen2TokenizerFast": (QWEN2_PATTERN, "NFC")}
RESERVED = "<|reserved_{}|>"   # fills ids that the weights have but the tokenizer names no token for
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE_FILE = "chat_template.jinja"   # where newer transformers keep the template (it wins over the config)


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable spelling of bytes: printable Latin-1 bytes stand for themselves,
    the other 68 (control characters, space, ...) become chr(256), chr(257), ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def spelled_to_bytes(token: str) -> bytes | None:
    """'Ġhello' -> b' hello'; None if the string is not a byte-level spelling (an added token such as "<|im_end|>")."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def bytes_to_spelled(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# ----------------------------------------------------------------------------------
# The tokenizer


class PretrainedTokenizer(Tokenizer):
    """A byte-level BPE given as ranks {token bytes: id} + split regex + special tokens {text: id}.

    normalization="NFC" composes characters before encoding (Qwen2 does: "e" + U+0301 -> "é").
    default_system_prompt: the system message the model's chat template adds when a
    conversation has none (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...").
    chat_refusal: for a model whose own chat template is not ChatML, the one line that asking
    for <|im_start|> or <|im_end|> raises (so every chat use, which renders ChatML, stops there).
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int],
                 normalization: str | None = None, default_system_prompt: str | None = None,
                 eot_token: str = "<|endoftext|>", chat_refusal: str | None = None):
        if normalization not in (None, "NFC"):
            raise ValueError(f"normalization {normalization!r} is not supported (only NFC)")
        self.ranks, self.pattern, self.normalization = dict(ranks), pattern, normalization
        self.default_system_prompt, self.eot_token = default_system_prompt, eot_token
        self.chat_refusal = chat_refusal   # not part of the fingerprint: it changes no id
        clash = sorted(set(self.ranks.values()) & set(special_tokens.values()))
        if clash:
            raise ValueError(f"token id {clash[0]} is both an ordinary and a special token")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError("two special tokens share one id")
        # every id below the largest one must name a token (tiktoken decodes only known ids): fill gaps
        used = set(self.ranks.values()) | set(special_tokens.values())
        n_vocab = max(used) + 1
        specials = dict(special_tokens)
        specials.update({RESERVED.format(i): i for i in range(n_vocab) if i not in used})
        self.special_ids = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        self.special_tokens = tuple(self.special_ids)
        # tiktoken needs a token for every byte; a vocabulary that lacks some (SmolLM2 has none for 21 bytes
        # it never saw, such as 0x04 or 0xFF) gets them at ids past the end, which encode then drops, as
        # the reference tokenizer drops bytes it has no token for
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in self.ranks]
        self._n_vocab = n_vocab
        self._enc = tiktoken.Encoding(name=f"pretrained-{self.fingerprint}", pat_str=pattern,
                                      mergeable_ranks={**self.ranks, **{b: n_vocab + k for k, b in enumerate(missing)}},
                                      special_tokens=self.special_ids, explicit_n_vocab=n_vocab + len(missing))
        self._drops_bytes = bool(missing)
        # bytes per token (0 for special tokens), for bits per byte
        self.token_bytes = np.zeros(n_vocab, dtype=np.int32)
        for token, i in self.ranks.items():
            self.token_bytes[i] = len(token)

    # --- what differs from our own Tokenizer ----------------------------------

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(json.dumps([self.pattern, self.normalization, self.default_system_prompt,
                                           self.eot_token, self.special_ids]).encode("utf-8"))
            for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                h.update(i.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def eot_id(self) -> int:
        return self._special_id(self.eot_token)

    @property
    def im_start_id(self) -> int:
        return self._special_id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._special_id("<|im_end|>")

    def _special_id(self, name: str) -> int:
        if name in CHAT_TOKENS and self.chat_refusal:   # the model chats in a format of its own, not ChatML
            raise ValueError(self.chat_refusal)
        if name not in self.special_ids:
            raise ValueError(f"this tokenizer has no {name} token (it knows {list(self.special_ids)[:6]}...): "
                             f"it was not made for chat; `with_special_tokens` adds it")
        return self.special_ids[name]

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalization == "NFC" else text

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def _known(self, ids: list[int]) -> list[int]:
        """Without the ids of bytes the vocabulary has no token for (see __init__)."""
        if not (self._drops_bytes and ids and max(ids) >= self._n_vocab):
            return ids
        return [i for i in ids if i < self._n_vocab]

    def encode(self, text: str, allowed_special="none") -> list[int]:
        return self._known(super().encode(self.normalize(text), allowed_special))

    def encode_ordinary(self, text: str) -> list[int]:
        return self._known(super().encode_ordinary(self.normalize(text)))

    def encode_batch(self, texts: Sequence[str], allowed_special="none", num_threads: int | None = None):
        return [self._known(ids) for ids in super().encode_batch([self.normalize(t) for t in texts],
                                                                 allowed_special, num_threads)]

    def tokens(self) -> list[bytes]:
        """The ordinary tokens' bytes, in id order."""
        return [t for t, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])]

    def with_special_tokens(self, names: Sequence[str]) -> "PretrainedTokenizer":
        """A copy with `names` appended as new special tokens (ids vocab_size, vocab_size+1, ...)."""
        specials = {k: v for k, v in self.special_ids.items() if not k.startswith("<|reserved_")}
        for name in names:
            if name not in specials:
                specials[name] = max(self.vocab_size, max(specials.values(), default=0) + 1)
        return PretrainedTokenizer(self.ranks, self.pattern, specials, self.normalization,
                                   self.default_system_prompt, self.eot_token, self.chat_refusal)

    def padded_to(self, vocab_size: int) -> "PretrainedTokenizer":
        """A copy whose ids reach vocab_size - 1 (models pad their embedding, e.g. Qwen2.5: 151,665 -> 151,936)."""
        if vocab_size <= self.vocab_size:
            return self
        specials = {**self.special_ids, RESERVED.format(vocab_size - 1): vocab_size - 1}
        return PretrainedTokenizer(self.ranks, self.pattern, specials, self.normalization,
                                   self.default_system_prompt, self.eot_token, self.chat_refusal)

    # --- saving and loading ---------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FORMAT, "vocab_size": self.vocab_size, "pattern": self.pattern,
                "normalization": self.normalization, "default_system_prompt": self.default_system_prompt,
                "eot_token": self.eot_token,
                **({"chat_refusal": self.chat_refusal} if self.chat_refusal else {}),   # saved: the refusal stays
                "special_tokens": {k: v for k, v in self.special_ids.items() if not k.startswith("<|reserved_")},
                "tokens": [base64.b64encode(t).decode("ascii") for t in self.tokens()],
                "token_ids": sorted(self.ranks.values())}

    def save(self, path) -> None:
        """One JSON file, one base64 token per line (atomically: temp file, then rename)."""
        path = Path(path)
        d = self.to_dict()
        tokens, ids = d.pop("tokens"), d.pop("token_ids")
        contiguous = ids == list(range(len(ids)))   # the usual case: ordinary ids are 0..n-1
        if not contiguous:
            d["token_ids"] = ids
        head = json.dumps(d, ensure_ascii=False, indent=1)[:-2]
        body = ",\n".join(f'  "{t}"' for t in tokens)
        atomic_write_text(path, f'{head},\n "tokens": [\n{body}\n ]\n}}\n')

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainedTokenizer":
        tokens = [base64.b64decode(t) for t in d["tokens"]]
        ids = d.get("token_ids", range(len(tokens)))
        tok = cls(dict(zip(tokens, ids)), d["pattern"], d["special_tokens"], d.get("normalization"),
                  d.get("default_system_prompt"), d.get("eot_token", "<|endoftext|>"), d.get("chat_refusal"))
        tok = tok.padded_to(d["vocab_size"])
        if tok.vocab_size != d["vocab_size"]:
            raise ValueError(f"vocab_size {d['vocab_size']} does not match the tokens ({tok.vocab_size})")
        return tok

    @classmethod
    def load(cls, path) -> "PretrainedTokenizer":
        return read_tokenizer_file(path, {FORMAT: cls.from_dict})

    def __getstate__(self):
        return self.to_dict()

    def __setstate__(self, state):
        self.__dict__.update(PretrainedTokenizer.from_dict(state).__dict__)

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer(vocab_size={self.vocab_size}, tokens={len(self.ranks)}, "
                f"special={len(self.special_ids)}, fingerprint={self.fingerprint})")


# ----------------------------------------------------------------------------------
# Reading Hugging Face / tiktoken files


def read_tiktoken_file(path) -> dict[bytes, int]:
    """NAME.tiktoken: one "base64(token bytes) id" per line -> {bytes: id}."""
    ranks = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'base64-token id', got {line[:60]!r}") from None
    return ranks


def ranks_from_vocab_and_merges(vocab: dict[str, int], merges: list,
                                where: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """vocab {spelled token: id} + merges [(left, right), ...] -> (ranks {bytes: id}, added tokens {text: id}).

    Ordinary tokens are the 256 bytes and every merge result; any other vocab entry
    (GPT-2's "<|endoftext|>") is an added token. tiktoken merges the pair whose result has
    the smallest id, the reference merges in merges.txt order: the same thing exactly
    when ids grow with the merge order, which is checked here.
    """
    byte_tokens = [BYTE_TO_CHAR[b] for b in range(256)]
    missing = [t for t in byte_tokens if t not in vocab]
    if len(missing) > 128:     # a few bytes may never have been seen (SmolLM2 lacks 21); most must be there
        raise ValueError(f"{where}: not a byte-level BPE vocabulary ({len(missing)} of the 256 byte tokens "
                         f"are missing, e.g. {missing[0]!r}); only GPT-2/Qwen2-style tokenizers are supported")
    ranks = {spelled_to_bytes(t): vocab[t] for t in byte_tokens if t in vocab}
    previous = -1
    for n, pair in enumerate(merges):
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        merged = left + right
        if merged not in vocab:
            raise ValueError(f"{where}: merge {n} ({left!r} {right!r}) makes {merged!r}, which is not in the vocab")
        if vocab[merged] <= previous:
            raise ValueError(f"{where}: merge {n} makes token id {vocab[merged]}, not above the previous merge's "
                             f"{previous}: tiktoken needs ids in merge order")
        if spelled_to_bytes(merged) is None:
            raise ValueError(f"{where}: merge {n} makes {merged!r}, which is not a byte-level token")
        previous = vocab[merged]
        ranks[spelled_to_bytes(merged)] = vocab[merged]
    ordinary = set(ranks.values())
    added = {t: i for t, i in vocab.items() if i not in ordinary}
    return ranks, added


def pattern_from_pre_tokenizer(pre: dict | None, where: str) -> str:
    """tokenizer.json's pre_tokenizer -> the split regex (Split + ByteLevel, or ByteLevel with GPT-2's regex)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    pattern = None
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ValueError(f"{where}: Split pre-tokenizer with behavior {step.get('behavior')} is not supported")
            pattern = step["pattern"]["Regex"]
        elif step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{where}: add_prefix_space=true is not supported (GPT-2 and Qwen2 use false)")
            if step.get("use_regex", True):
                pattern = GPT2_PATTERN
        else:
            raise ValueError(f"{where}: pre-tokenizer {step.get('type')!r} is not supported; only byte-level "
                             f"BPE tokenizers (GPT-2, Qwen2 style: Split + ByteLevel) are")
    if pattern is None:
        raise ValueError(f"{where}: no split regex in the pre_tokenizer")
    return pattern


def read_tokenizer_json(path) -> tuple[dict[bytes, int], dict[str, int], str, str | None]:
    """tokenizer.json -> (ranks, added tokens {text: id}, split regex, normalization)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    model = d.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "BPE tokenizer with byte_fallback (SentencePiece style)" if model.get("byte_fallback") \
            else f"{model.get('type')} tokenizer"
        raise ValueError(f"{path}: a {kind}; only byte-level BPE (GPT-2, Qwen2 style) is supported")
    ranks, added = ranks_from_vocab_and_merges(model["vocab"], model["merges"], str(path))
    added.update({t["content"]: t["id"] for t in d.get("added_tokens", [])})
    pattern = pattern_from_pre_tokenizer(d.get("pre_tokenizer"), str(path))
    norm = d.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{path}: normalizer {norm.get('type')!r} is not supported (none or NFC)")
    return ranks, added, pattern, "NFC" if norm else None


# the newline after "system" is written "\n" in Qwen2.5's Jinja text, and is a real newline in SmolLM2's
DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>")


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message a ChatML chat template inserts when there is none (Qwen2.5, SmolLM2 do), else None."""
    match = DEFAULT_SYSTEM_RE.search(chat_template or "")
    return match.group(1) if match else None


def read_chat_template(folder) -> tuple[str | None, Path | None]:
    """The chat template a model folder brings (Jinja text) and the file that holds it, or (None, None).

    chat_template.jinja if there is one (transformers reads it first), else tokenizer_config.json's
    "chat_template": a string, or a list of named templates of which "default" is the chat one.
    """
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).exists():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"), folder / CHAT_TEMPLATE_FILE
    path = folder / "tokenizer_config.json"
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.exists() else None
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return (template, path) if isinstance(template, str) and template.strip() else (None, None)


def chats_in_chatml(template: str | None, special_tokens: dict[str, int]) -> bool:
    """ChatML is right for a model without a template (a base model: ChatML is what it will be taught) and
    for one whose template writes <|im_start|>/<|im_end|>, tokens of its own vocabulary (Qwen2.5, SmolLM2)."""
    return template is None or all(t in template and t in special_tokens for t in CHAT_TOKENS)


def chat_refusal(template: str | None, source: Path | None, special_tokens: dict[str, int]) -> str | None:
    """None if the project may chat with this model in ChatML, else the one line that says why not and what to do.

    ChatML is right for a model without a template (a base model: ChatML is what it will be
    taught) and for one whose template writes <|im_start|>/<|im_end|>, tokens of its own vocabulary
    (Qwen2.5, SmolLM2). Any other template is the model's own format (Llama-3: <|start_header_id|>
    ...<|eot_id|>): ChatML with two new, untrained tokens would prompt it wrongly, so chat is refused.
    """
    if chats_in_chatml(template, special_tokens):
        return None
    folder = source.parent
    remove = f"delete its {source.name}" if source.name == CHAT_TEMPLATE_FILE \
        else 'delete "chat_template" from its tokenizer_config.json'
    return (f"{source}: {folder} has its own chat template, not ChatML, and this project chats only in ChatML: "
            f"use it for text continuation (python inference.py --ckpt {folder} --chat off), or fine-tune it "
            f"into a ChatML chat model from a copy of the folder without that template ({remove}; then "
            f"python full_sft.py --init_from COPY)")


def load_hf_tokenizer_files(folder) -> PretrainedTokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json, or vocab.json + merges.txt,
    or a *.tiktoken file, with tokenizer_config.json for added tokens, and its chat template (read_chat_template)."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    tokenizer_class = config.get("tokenizer_class")
    pattern, normalization = TOKENIZER_CLASSES.get(tokenizer_class, (None, None))
    tiktoken_files = sorted(folder.glob("*.tiktoken"))
    if (folder / "tokenizer.json").exists():
        ranks, added, pattern, normalization = read_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        ranks, added = ranks_from_vocab_and_merges(vocab, merges, str(folder / "merges.txt"))
    elif tiktoken_files:
        ranks, added = read_tiktoken_file(tiktoken_files[0]), {}
    else:
        raise FileNotFoundError(f"{folder}/ has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt, "
                                f"or a .tiktoken file (copy them from the model's folder)")
    if pattern is None:
        raise ValueError(f"{config_path}: tokenizer_class {tokenizer_class!r} does not say which split regex "
                         f"to use; known: {sorted(TOKENIZER_CLASSES)}")
    for i, token in (config.get("added_tokens_decoder") or {}).items():
        added[token["content"]] = int(i)
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eot = "<|endoftext|>" if "<|endoftext|>" in added else (eos or "<|endoftext|>")
    template, source = read_chat_template(folder)
    return PretrainedTokenizer(ranks, pattern, added, normalization, default_system_prompt(template), eot,
                               chat_refusal(template, source, added))


# ----------------------------------------------------------------------------------
# Writing Hugging Face files


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge that made each token: BPE its bytes with only the tokens of lower
    rank; what is left is exactly two parts, the pair. In rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {rank} ({token!r}) cannot be built by merging two earlier tokens")
        merges.append((parts[0], parts[1]))
    return merges


def chatml_template(default_system: str | None) -> str:
    """The Jinja chat template transformers runs, rendering exactly like tokenizer/chat.py's render_chat."""
    system = ""
    if default_system:
        system = ("{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                  + default_system.replace("'", "\\'") + "<|im_end|>\\n' }}{%- endif %}")
    return (system + "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, dict]:
    """Our tokenizer (trained or imported) as {"tokenizer.json": ..., "tokenizer_config.json": ...}.

    A byte-level BPE model with merges, our split regex (Split + ByteLevel), NFC if the
    tokenizer uses it, and the special tokens as added tokens. ignore_merges=true makes the
    reference take a whole chunk that is one token directly, as tiktoken does.
    """
    if isinstance(tokenizer, PretrainedTokenizer):
        ranks, normalization = tokenizer.ranks, tokenizer.normalization
        merges, default_system = merges_from_ranks(ranks), tokenizer.default_system_prompt
    else:   # our own: ids 0..255 are the bytes, then one token per merge
        vocab = merges_to_vocab(tokenizer.merges)
        ranks, normalization, default_system = {t: i for i, t in enumerate(vocab)}, None, None
        merges = [(vocab[a], vocab[b]) for a, b in tokenizer.merges]
    # placeholder names of padded ids stay out: the reference tokenizer has no token there either
    specials = {k: v for k, v in tokenizer.special_ids.items() if not k.startswith("<|reserved_")}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials.items()],
        "normalizer": {"type": "NFC"} if normalization == "NFC" else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {bytes_to_spelled(t): i for t, i in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[bytes_to_spelled(a), bytes_to_spelled(b)] for a, b in merges]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>" if "<|endoftext|>" in specials
              else None, "pad_token": "<|endoftext|>" if "<|endoftext|>" in specials else None}
    if all(t in specials for t in CHAT_TOKENS) and not getattr(tokenizer, "chat_refusal", None):
        config["chat_template"] = chatml_template(default_system)   # a model that refuses ChatML gets none
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}
