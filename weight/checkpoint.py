"""
weight/checkpoint.py -- checkpoint folders: save, load, LoRA adapters, and the tokenizer that
belongs to the weights.

    weight/sft/
        model.pt         the weights (a state_dict of tensors; the best ones of the run)
        config.json      the model config, the tokenizer's fingerprint, the training arguments
        tokenizer.json   a copy of the tokenizer, so the folder stands alone
        metrics.json     the stage's final numbers
        resume.pt        everything needed to continue (weights, optimizer, step, RNG)
        log.csv, loss.png

    weight/lora/         an adapter: adapter.pt (the A and B matrices) + adapter_config.json,
                         which names the base checkpoint it was trained on

`load_checkpoint` also reads a Hugging Face model folder (weight/hf.py) and a .gguf file
(weight/gguf.py) as they are. Weights are read without running pickled code
(torch.load(weights_only=True), safetensors, GGUF).
Loading a model to chat, serve, evaluate or export needs only this file, never the
training loop.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from atomic import atomic_path, atomic_write_text
from model import ModelConfig, build_model
from tokenizer import load_tokenizer
from weight.gguf import installed_gguf, is_gguf_file, load_gguf_checkpoint, load_gguf_tokenizer
from weight.hf import is_hf_folder, load_hf_checkpoint, load_hf_tokenizer

ROOT = Path(__file__).resolve().parent.parent     # the repository
WEIGHTS_FILE = "model.pt"      # weights only (the best checkpoint): state_dict of tensors
RESUME_FILE = "resume.pt"      # everything needed to continue: weights, optimizer, step, RNG
CONFIG_FILE = "config.json"    # model config, tokenizer, training arguments
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer, so a checkpoint stands alone
METRICS_FILE = "metrics.json"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.pt", "adapter_config.json"   # a LoRA adapter folder (lora.py)


def save_checkpoint(out_dir: Path, model, meta: dict, tokenizer=None):
    """Weights (model.pt), config.json (model config + meta) and a copy of the tokenizer.

    The files are written to temp files first and renamed one right after the other at the end,
    and config.json records a checksum of the weights: a load then notices the one case left, a
    process killed between two renames (new weights beside the old config)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = {"model": model.config.to_dict(), **meta, "weights_checksum": state_checksum(state)}
    with contextlib.ExitStack() as files:      # on leaving: every temp file renamed into place, last one first
        torch.save(state, files.enter_context(atomic_path(out_dir / WEIGHTS_FILE)))
        files.enter_context(atomic_path(out_dir / CONFIG_FILE)).write_text(
            json.dumps(config, indent=2, default=str), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(files.enter_context(atomic_path(out_dir / TOKENIZER_FILE)))


def load_checkpoint(ckpt_dir: str | Path, device="cpu", make_hint: str = "python pretrain.py"):
    """Rebuild the model a checkpoint folder describes. Returns (model, config dict).

    Weights are read with weights_only=True: no pickled code runs. A Hugging Face model
    folder (GPT-2, Qwen2, Llama: config.json with a model_type) is converted on the fly.
    """
    ckpt_dir = installed_gguf(ckpt_dir) or Path(ckpt_dir)       # "smollm2": the file its package ships
    if is_hf_folder(ckpt_dir):
        return load_hf_checkpoint(ckpt_dir, device)
    if is_gguf_file(ckpt_dir):
        return load_gguf_checkpoint(ckpt_dir, device)
    config_path, weights_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
    if (ckpt_dir / ADAPTER_CONFIG).exists() and not weights_path.exists():
        raise ValueError(f"{ckpt_dir}/ is a LoRA adapter, not a full checkpoint: use --lora {ckpt_dir} (inference, "
                         f"evaluation, serve) or merge it first: `python lora.py --merge --out_dir {ckpt_dir}`")
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: no checkpoint in {ckpt_dir}/; "
                                    f"create one with `{make_hint}`")
    try:
        config = json.loads(config_path.read_text())
        model_config = ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a checkpoint config ({type(e).__name__}: {e}); "
                         f"recreate the checkpoint with `{make_hint}`") from None
    model = build_model(model_config)   # GPT, or Seq2Seq for an encoder-decoder config
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if "weights_checksum" in config and abs(state_checksum(state) - config["weights_checksum"]) > 1e-6:
        raise ValueError(f"{ckpt_dir}/: {WEIGHTS_FILE} and {CONFIG_FILE} come from two different saves (the run "
                         f"was stopped while saving): rerun its stage with --resume to save them again, or retrain")
    model.load_state_dict(state)
    return model.to(device), config


def load_decoder_only(ckpt_dir: str | Path, device, stage: str, make_hint: str = "python full_sft.py"):
    """load_checkpoint for the stages that read a prompt and its answer as one decoder-only sequence
    (dpo.py, grpo.py, verifier.py, distill.py): an encoder-decoder model is refused in one line."""
    model, config = load_checkpoint(ckpt_dir, device, make_hint=make_hint)
    if model.config.n_encoder_layer:
        raise ValueError(f"{ckpt_dir} is an encoder-decoder model: {stage} reads a prompt and its answer as one "
                         f"decoder-only sequence; fine-tune an encoder-decoder model with full_sft.py or lora.py")
    return model, config


def same_tokens(a, b, probe: str = "a test of the two vocabularies, 你好") -> bool:
    """Whether two tokenizers (ours or imported) give the same ids: a quick check before one model's
    distributions or scores are read against another's (distill.py, a verifier)."""
    return a.encode(probe) == b.encode(probe) and a.vocab_size == b.vocab_size


def load_checkpoint_tokenizer(ckpt_dir: str | Path):
    """The tokenizer a checkpoint was trained with: its tokenizer.json, or a Hugging Face folder's own files."""
    ckpt_dir = installed_gguf(ckpt_dir) or ckpt_dir
    if is_hf_folder(ckpt_dir):
        return load_hf_tokenizer(ckpt_dir)
    if is_gguf_file(ckpt_dir):
        return load_gguf_tokenizer(ckpt_dir)
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.exists():   # a newly trained tokenizer would not match the weights: say where the right one is
        raise FileNotFoundError(f"{path} not found: copy the tokenizer this model was trained with there "
                                f"(pretrain.py's --tokenizer, by default tokenizer/default.json) or pass --tokenizer")
    return load_tokenizer(path)


def checkpoint_path(ckpt: str | Path) -> Path:
    """The file or folder a --init_from / --ckpt names: "smollm2" is the .gguf file its package ships."""
    return installed_gguf(ckpt) or Path(ckpt)


def tokenizer_source(ckpt: str | Path) -> Path:
    """Where load_checkpoint_tokenizer reads from: a .gguf file or a Hugging Face folder itself, else tokenizer.json."""
    path = checkpoint_path(ckpt)
    return path if is_gguf_file(path) or is_hf_folder(path) else path / TOKENIZER_FILE


def weight_files(ckpt: str | Path) -> list[Path]:
    """The files that hold a checkpoint's weights: the .gguf file, or the folder's model.pt / *.safetensors."""
    path = checkpoint_path(ckpt)
    if is_gguf_file(path):
        return [path]
    return [f for f in [path / WEIGHTS_FILE, *sorted(path.glob("*.safetensors"))] if f.exists()]


def check_tokenizer_matches(config: dict, tokenizer, where: str):
    """A checkpoint trained with one tokenizer gives garbage with another: refuse clearly."""
    expected = config.get("tokenizer", {}).get("fingerprint")
    if expected and expected != tokenizer.fingerprint:
        raise ValueError(f"{where} was trained with tokenizer {expected}, but the tokenizer given is "
                         f"{tokenizer.fingerprint}: use the checkpoint's own {TOKENIZER_FILE} or retrain")


# ----------------------------------------------------------------------------------
# LoRA adapters (trained by lora.py)


def state_checksum(state: dict) -> float:
    """A cheap fingerprint of weights (the sum of every tensor's mean): tells two saves or two bases apart."""
    return round(sum(t.float().mean().item() for t in state.values()), 6)


def weights_checksum(model) -> float:
    return state_checksum(model.state_dict())


def adapter_base(adapter_config: dict) -> Path:
    """The base checkpoint an adapter names: as written, or relative to the repository (weight/sft)
    when the adapter is used from another working directory."""
    base = Path(adapter_config["init_from"])
    if not base.is_absolute() and not base.exists() and (ROOT / base).exists():
        return ROOT / base
    return base


def save_adapter(out_dir: Path, adapter: dict, meta: dict):
    """adapter.pt (the lora_A / lora_B tensors) and adapter_config.json (what they belong to)."""
    with atomic_path(Path(out_dir) / ADAPTER_FILE) as tmp:
        torch.save(adapter, tmp)
    atomic_write_text(Path(out_dir) / ADAPTER_CONFIG, json.dumps(meta, indent=2, default=str))


def adapted_layers(model, target_modules) -> list[str]:
    """The names of the linear layers a LoRA adapter with these target_modules adapts ("q_proj", ...)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple(target_modules))]


def load_adapted_model(adapter_dir: str | Path, device="cpu"):
    """The base checkpoint (named in adapter_config.json) with its adapter folded into the weights:
    W <- W + (alpha / r) * B A for every adapted layer, so it runs as fast as the base.
    Returns (model, adapter config)."""
    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"{adapter_dir / name} not found: train an adapter with `python lora.py`")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    model, base_config = load_checkpoint(adapter_base(config), make_hint="python full_sft.py")
    if base_config.get("tokenizer", {}).get("fingerprint") != config.get("tokenizer", {}).get("fingerprint") \
            or model.config.to_dict() != config.get("base_model") \
            or abs(weights_checksum(model) - config.get("base_checksum", float("nan"))) > 1e-4:
        raise ValueError(f"{adapter_dir} was trained on another base model than {config['init_from']}: "
                         f"use the base it was trained on")
    lora = config["lora"]
    adapter = torch.load(adapter_dir / ADAPTER_FILE, weights_only=True)
    adapted = adapted_layers(model, lora["target_modules"])
    missing = [name for name in adapted if f"{name}.lora_A" not in adapter or f"{name}.lora_B" not in adapter]
    if missing:
        raise ValueError(f"{adapter_dir / ADAPTER_FILE} lacks the adapter of {len(missing)} layers "
                         f"({missing[0]}, ...): retrain it")
    scaling = lora["alpha"] / lora["rank"]
    with torch.no_grad():
        for name in adapted:
            A, B = adapter[f"{name}.lora_A"], adapter[f"{name}.lora_B"]      # (r, in), (out, r)
            model.get_submodule(name).weight += scaling * (B @ A)          # (out, in)
    return model.to(device), config


def load_model(ckpt: str | Path = "", lora: str | Path = "", device="cpu", make_hint: str = "python pretrain.py"):
    """What chatting, evaluating, serving and exporting start from: the checkpoint folder `ckpt`, or the
    LoRA adapter folder `lora` folded into the base checkpoint it names (then the base's tokenizer).
    Returns (model, tokenizer, config dict, the folder the weights and tokenizer come from)."""
    if lora:
        model, config = load_adapted_model(lora, device)
        folder = adapter_base(config)
        config = {**config, "stage": "lora"}
    else:
        model, config = load_checkpoint(ckpt, device, make_hint=make_hint)
        folder = Path(ckpt)
    return model, load_checkpoint_tokenizer(folder), config, folder
