"""
weight/hf.py -- public weights in and out: GPT-2, Qwen2/Qwen2.5 (and Llama) Hugging Face folders.

    python -m weight import /models/Qwen2.5-0.5B-Instruct weight/qwen     # -> a project checkpoint
    python -m weight export weight/sft /tmp/sft-hf                        # -> a folder transformers loads
    python -m weight export weight/lora /tmp/lora-hf                      # a LoRA adapter, merged first

Every stage also takes such a folder as it is (weight/checkpoint.py's load_checkpoint calls
load_hf_checkpoint): `python full_sft.py --init_from /models/Qwen2.5-0.5B-Instruct`.

A Hugging Face model folder holds config.json (the architecture), model.safetensors (or
shards listed in model.safetensors.index.json) and the tokenizer files (tokenizer/hf.py).
model.py is the same machine under other names:

    GPT-2 (model_type gpt2)       = flavour "gpt2": LayerNorm, tanh-GELU, learned positions. Its
                                    linear layers are "Conv1D", which store weights as (in, out), so
                                    they are transposed; q, k, v are thirds of one fused c_attn.
    Qwen2/Qwen2.5 (qwen2)         = flavour "llama" with qkv_bias: RMSNorm, SwiGLU, RoPE (theta 1e6),
                                    grouped-query attention, biases on q/k/v only.
    Llama (llama)                 = flavour "llama" without biases.

Chat is ChatML here (tokenizer/chat.py). A folder without a chat template (GPT-2, a base
model) gets <|im_start|>/<|im_end|> as two new tokens for SFT to teach; one whose template is
ChatML (Qwen2.5, SmolLM2) chats with its own tokens; one with any other template (Llama-3)
keeps its vocabulary as it is and refuses chat in one line (tokenizer/hf.py's chat_refusal):
it still continues text.

Weights are read with safetensors (no pickle), one tensor at a time, in the dtype asked
for, into a model built on the "meta" device (shapes only, no memory): the peak is the
model itself plus one tensor. The memory needed is estimated first, and refused if it
does not fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atomic import atomic_path, atomic_write_text
from model import GPT, ModelConfig, rope_tables
from tokenizer.hf import (CHAT_TOKENS, PretrainedTokenizer, hf_tokenizer_files, load_hf_tokenizer_files,
                          read_chat_template)

SUPPORTED = ("gpt2", "qwen2", "llama")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tensor names: ours -> theirs, per module (the parameter name, weight or bias, is kept).
LLAMA_TOP = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
               "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn.gate_proj": "mlp.gate_proj",
               "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj"}
GPT2_TOP = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "final_norm": "transformer.ln_f",
            "lm_head": "lm_head"}
GPT2_BLOCK = {"attn_norm": "ln_1", "attn.o_proj": "attn.c_proj", "ffn_norm": "ln_2",
              "ffn.up_proj": "mlp.c_fc", "ffn.down_proj": "mlp.c_proj"}   # q/k/v: thirds of attn.c_attn
GPT2_CONV1D = ("attn.o_proj", "ffn.up_proj", "ffn.down_proj")               # stored transposed (in, out)
# tensors a checkpoint may hold that are not weights (causal-mask buffers, cached RoPE frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def hf_name(ours: str, flavour: str) -> str:
    """'blocks.3.attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj.weight' (or GPT-2's name)."""
    module, param = ours.rsplit(".", 1)
    top, block, layers = (GPT2_TOP, GPT2_BLOCK, "transformer.h") if flavour == "gpt2" else \
        (LLAMA_TOP, LLAMA_BLOCK, "model.layers")
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"{layers}.{i}.{block[rest]}.{param}"
    return f"{top[module]}.{param}"


# ----------------------------------------------------------------------------------
# Reading a folder


def is_hf_folder(folder) -> bool:
    """A Hugging Face model folder: its config.json has a "model_type" (ours has "model")."""
    path = Path(folder) / "config.json"
    try:
        return "model_type" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs config.json, "
                                f"{SINGLE_FILE} and the tokenizer files")
    hf = json.loads(path.read_text(encoding="utf-8"))
    if hf.get("model_type") not in SUPPORTED:
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not supported; supported: "
                         f"gpt2 (GPT-2), qwen2 (Qwen2, Qwen2.5), llama")
    return hf


class SafetensorsReader:
    """Tensor name -> file, for model.safetensors or shards listed in model.safetensors.index.json.
    Tensors are read one at a time (memory-mapped files), never all at once."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_FILE).exists():
            weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).exists():
                    raise FileNotFoundError(f"{folder / INDEX_FILE} lists shard {shard}, which is not in "
                                            f"{folder}/: download or copy every shard")
        elif (folder / SINGLE_FILE).exists():
            weight_map = None
        else:
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
            extra = f" ({', '.join(pickled)} is a pickle file, which is never loaded: get the safetensors " \
                    f"version)" if pickled else ""
            raise FileNotFoundError(f"{folder}/ has no {SINGLE_FILE} or {INDEX_FILE}{extra}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        self.file_of = {name: f for f, h in self.handles.items() for name in h.keys()}
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def resolve(self, name: str) -> str:
        """The name as stored (GPT-2 files from the original release lack the "transformer." prefix)."""
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in self.file_of:
                return candidate
        raise ValueError(f"{self.folder}/: the weights have no tensor {name}; config.json and the weights disagree")

    def shape(self, name: str) -> list[int]:
        name = self.resolve(name)
        return self.handles[self.file_of[name]].get_slice(name).get_shape()

    def read(self, name: str) -> torch.Tensor:
        name = self.resolve(name)
        self.used.add(name)
        return self.handles[self.file_of[name]].get_tensor(name)

    def unused(self) -> list[str]:
        return [n for n in self.names() if n not in self.used and not n.endswith(IGNORED_SUFFIXES)]


# ----------------------------------------------------------------------------------
# Config: theirs -> ours and back


def model_config_from_hf(hf: dict, vocab_size: int, where: str) -> ModelConfig:
    """config.json -> ModelConfig; ValueError (one line) for a variant model.py cannot compute exactly."""
    kind = hf["model_type"]

    def refuse(what: str):
        raise ValueError(f"{where}: {what} is not supported by model.py")

    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse(f"activation_function {hf['activation_function']!r}")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(flag):
                refuse(f"{flag}=true")
        if not hf.get("scale_attn_weights", True):
            refuse("scale_attn_weights=false")
        return ModelConfig(flavour="gpt2", vocab_size=vocab_size, block_size=hf["n_positions"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    # qwen2 and llama: RoPE, RMSNorm, SwiGLU, grouped-query attention
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window=true")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("attention_bias/mlp_bias=true")
    return ModelConfig(flavour="llama", vocab_size=vocab_size, block_size=hf["max_position_embeddings"],
                       n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                       n_kv_head=hf.get("num_key_value_heads") or n_head, ffn_hidden=hf["intermediate_size"],
                       qkv_bias=kind == "qwen2", bias=False,
                       tie_embeddings=hf.get("tie_word_embeddings", False),
                       rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                       norm_eps=hf.get("rms_norm_eps", 1e-6))


def hf_config_from_model(cfg: ModelConfig, tokenizer, dtype: torch.dtype) -> dict:
    """ModelConfig -> config.json of GPT2LMHeadModel, Qwen2ForCausalLM (q/k/v biases) or LlamaForCausalLM."""
    unusual = [f.name for f in fields(ModelConfig) if f.name not in EXPORTED_FIELDS
               and getattr(cfg, f.name) != f.default
               and not (f.name == "decoder_start_id" and not cfg.n_encoder_layer)]   # unused without an encoder
    if unusual:
        raise ValueError(f"the model sets {unusual}, which no Hugging Face architecture here has: cannot export")
    gpt2 = dict(position="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    wanted = gpt2 if cfg.flavour == "gpt2" else llama
    differ = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
    if cfg.flavour == "gpt2" and cfg.n_kv_head != cfg.n_head:
        differ["n_kv_head"] = cfg.n_kv_head
    if differ:
        raise ValueError(f"a {cfg.flavour} model with {differ} has no Hugging Face architecture: cannot export")
    ids = tokenizer.special_ids
    eot = ids.get("<|endoftext|>")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot,
              "eos_token_id": eot, "torch_dtype": str(dtype).removeprefix("torch.")}
    if cfg.flavour == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.ffn_hidden, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    kind = "qwen2" if cfg.qkv_bias else "llama"
    return {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"], "model_type": kind,
            **common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, "use_sliding_window": False, "attention_dropout": 0.0}


# the fields hf_config_from_model maps (flavour switches are checked one by one)
EXPORTED_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "flavour", "position",
                   "norm", "mlp", "bias", "qkv_bias", "tie_embeddings", "ffn_hidden", "rope_theta", "norm_eps",
                   "dropout"}


# ----------------------------------------------------------------------------------
# Memory


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on device (None if unknown: then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_memory(n_params: int, dtype: torch.dtype, device: torch.device, where: str):
    """Refuse before loading if the weights alone will not fit."""
    need = n_params * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if free is not None and need > free:
        smaller = " (bfloat16 needs half of float32)" if dtype == torch.float32 else ""
        raise ValueError(f"{where}: {n_params / 1e9:.2f}B parameters need {need / 2**30:.1f} GiB in "
                         f"{str(dtype).removeprefix('torch.')}, but only {free / 2**30:.1f} GiB is free on "
                         f"{device}: free memory, use a smaller dtype{smaller} or a bigger machine")


# ----------------------------------------------------------------------------------
# Import


def tokenizer_for_weights(folder: Path, hf: dict, rows: int) -> PretrainedTokenizer:
    """The folder's tokenizer, made to fit the weights' `rows` embedding rows.

    Models pad their embedding (Qwen2.5: 151,665 tokens, 151,936 rows): the extra ids get
    placeholder names. A tokenizer without <|im_start|>/<|im_end|> and without a chat template
    (GPT-2) gets them as two new ids after the rows, so the chat stages can teach it ChatML (the
    weights grow by two rows). A model with a chat template of its own that is not ChatML gets
    nothing: two untrained tokens would prompt it wrongly, and its tokenizer refuses chat instead.
    """
    tokenizer = load_hf_tokenizer_files(folder)
    if tokenizer.vocab_size > rows:
        raise ValueError(f"{folder}/: the tokenizer has {tokenizer.vocab_size:,} tokens but the weights have "
                         f"{rows:,} embedding rows: the tokenizer files belong to another model")
    for key in ("eos_token_id", "bos_token_id"):
        for i in hf.get(key) if isinstance(hf.get(key), list) else [hf.get(key)]:
            if i is not None and i not in tokenizer.special_ids.values():
                raise ValueError(f"{folder / 'config.json'}: {key} {i} is not a special token of the tokenizer "
                                 f"files: they belong to another model")
    tokenizer = tokenizer.padded_to(rows)
    if not all(t in tokenizer.special_ids for t in CHAT_TOKENS) and not tokenizer.chat_refusal:
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    return tokenizer


def load_hf_tokenizer(folder) -> PretrainedTokenizer:
    folder = Path(folder)
    hf = read_hf_config(folder)
    reader = SafetensorsReader(folder)
    return tokenizer_for_weights(folder, hf, embedding_rows(reader, hf))


def embedding_rows(reader: SafetensorsReader, hf: dict) -> int:
    name = hf_name("tok_emb.weight", "gpt2" if hf["model_type"] == "gpt2" else "llama")
    rows = reader.shape(name)[0]
    if hf.get("vocab_size") not in (None, rows):
        raise ValueError(f"{reader.folder / 'config.json'}: vocab_size {hf['vocab_size']} but the embedding "
                         f"{name} has {rows} rows: config.json and the weights disagree")
    return rows


def import_tensor(ours: str, cfg: ModelConfig, reader: SafetensorsReader) -> torch.Tensor:
    """Our tensor `ours`, made from the checkpoint's (GPT-2: transposed Conv1D, split c_attn)."""
    module, param = ours.rsplit(".", 1)
    if cfg.flavour != "gpt2":
        return reader.read(hf_name(ours, cfg.flavour))
    if module.endswith(("q_proj", "k_proj", "v_proj")):
        i = module.split(".")[1]
        fused = reader.read(f"transformer.h.{i}.attn.c_attn.{param}")       # (C, 3C) or (3C,)
        if param == "weight":
            fused = fused.T                                                  # (3C, C)
        return fused.chunk(3, dim=0)["qkv".index(module[-6])].contiguous()
    tensor = reader.read(hf_name(ours, "gpt2"))
    if param == "weight" and module.split(".", 2)[-1] in GPT2_CONV1D:
        tensor = tensor.T.contiguous()                                       # (in, out) -> (out, in)
    return tensor


def load_hf_model(folder, device="cpu", dtype: torch.dtype = torch.float32, hf: dict | None = None,
                  vocab_size: int | None = None) -> GPT:
    """Build our GPT from a Hugging Face folder's config.json + safetensors, lazily, in `dtype`
    (vocab_size > the weights' rows: see model_from_tensors)."""
    folder, device = Path(folder), torch.device(device)
    hf = hf or read_hf_config(folder)
    reader = SafetensorsReader(folder)
    rows = embedding_rows(reader, hf)
    cfg = model_config_from_hf(hf, vocab_size or rows, str(folder / "config.json"))
    model = model_from_tensors(cfg, lambda name: import_tensor(name, cfg, reader), device, dtype,
                               f"{folder}/", "this config.json")
    unused = [n for n in reader.unused() if not (cfg.tie_embeddings and n == "lm_head.weight")]
    if unused:
        raise ValueError(f"{folder}/: the weights hold {len(unused)} tensors this config.json has no place for "
                         f"(e.g. {unused[0]}): config.json and the weights disagree")
    return model


def model_from_tensors(cfg: ModelConfig, read, device: torch.device, dtype: torch.dtype, where: str,
                       described_by: str) -> GPT:
    """GPT(cfg) built on the "meta" device (shapes only: no memory, no random init), then filled one tensor
    at a time: read(our name) -> the tensor. Also used by weight/gguf.py.

    vocab_size > the weights' rows: the new rows start as the mean of the others (a neutral
    guess: their logits start near the average, so nothing changes until they are trained).
    """
    with torch.device("meta"):
        model = GPT(cfg)
    check_memory(model.num_params(), dtype, device, where)
    state = {}
    for name, meta in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = read(name)
        if name in ("tok_emb.weight", "lm_head.weight") and tensor.shape[0] < cfg.vocab_size:
            extra = cfg.vocab_size - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(extra, -1)])
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ValueError(f"{where}: {name} should be {tuple(meta.shape)} for {described_by}, the weights give "
                             f"{tuple(tensor.shape)}: {described_by} and the weights disagree")
        state[name] = tensor.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:                # one Parameter again, as GPT() ties them
        model.lm_head.weight = model.tok_emb.weight
    if cfg.position == "rope":            # buffers are not in the weights: compute them for real
        model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(cfg.head_dim, cfg.block_size,
                                                                              cfg.rope_theta))
    return model


def load_hf_checkpoint(folder, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, config dict) like weight/checkpoint.py's load_checkpoint, from a Hugging Face folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    tokenizer = tokenizer_for_weights(folder, hf, embedding_rows(SafetensorsReader(folder), hf))
    model = load_hf_model(folder, device, dtype, hf, vocab_size=tokenizer.vocab_size)
    # any template, ChatML or not, makes --chat auto chat with it: a template of another kind is then
    # refused in one line rather than quietly answered as text continuation
    has_template = read_chat_template(folder)[0] is not None
    config = {"model": model.config.to_dict(), "stage": "hf_import",
              "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
              "hf": {"folder": str(folder), "model_type": hf["model_type"],
                     "architectures": hf.get("architectures"), "original_vocab_rows": hf.get("vocab_size"),
                     "chat_template": has_template}}   # Qwen folders have one (base and instruct alike)
    return model, config


# ----------------------------------------------------------------------------------
# Export


def export_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state_dict under the Hugging Face names (GPT-2: fused c_attn, Conv1D transposed)."""
    cfg, ours = model.config, model.state_dict()
    theirs = {}
    for name, tensor in ours.items():
        module, param = name.rsplit(".", 1)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue                                       # transformers ties it to the embedding itself
        if cfg.flavour == "gpt2" and module.endswith(("k_proj", "v_proj")):
            continue                                       # fused into c_attn with q_proj below
        if cfg.flavour == "gpt2" and module.endswith("q_proj"):
            prefix = module[:-len("q_proj")]
            fused = torch.cat([ours[f"{prefix}{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")])  # (3C, ...)
            theirs[f"transformer.h.{module.split('.')[1]}.attn.c_attn.{param}"] = fused.T if param == "weight" \
                else fused
            continue
        if cfg.flavour == "gpt2" and param == "weight" and module.split(".", 2)[-1] in GPT2_CONV1D:
            tensor = tensor.T
        theirs[hf_name(name, cfg.flavour)] = tensor
    return theirs


def export_hf(model: GPT, tokenizer, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out_dir = Path(out_dir)
    hf = hf_config_from_model(model.config, tokenizer, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in export_state_dict(model).items()}
    with atomic_path(out_dir / SINGLE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)         # safetensors creates it readable by its owner only; the folder is meant to be shared
    ids = tokenizer.special_ids
    stop = [ids[t] for t in ("<|im_end|>", "<|endoftext|>") if t in ids]
    files = {"config.json": hf, "generation_config.json": {"bos_token_id": hf["bos_token_id"], "eos_token_id": stop},
             **hf_tokenizer_files(tokenizer, model.config.block_size)}
    for name, content in files.items():
        atomic_write_text(out_dir / name, json.dumps(content, indent=2, ensure_ascii=False))
    return out_dir
