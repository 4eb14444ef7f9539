"""
python -m weight -- public weights in and out of the project's checkpoint folders.

    python -m weight import /models/Qwen2.5-0.5B-Instruct weight/qwen   # Hugging Face folder -> checkpoint
    python -m weight export weight/sft /tmp/sft-hf                      # checkpoint -> Hugging Face folder
    python -m weight export weight/lora /tmp/lora-hf                    # a LoRA adapter, folded into its base
    python -m weight import SmolLM2-135M-Instruct.Q4_1.gguf weight/smollm  # GGUF file -> checkpoint
    python -m weight export weight/sft sft.gguf --dtype q8_0            # checkpoint -> GGUF (llama.cpp, Ollama)

The formats are weight/hf.py's and weight/gguf.py's; the checkpoint folders are weight/checkpoint.py's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atomic import atomic_folder
from flags import main_guard
from weight.checkpoint import ADAPTER_CONFIG, load_model, save_checkpoint
from weight.gguf import EXPORT_TYPES, SUFFIX, export_gguf, is_gguf_file, load_gguf_checkpoint, load_gguf_tokenizer
from weight.hf import (DTYPES, export_hf, hf_config_from_model, is_hf_folder, load_hf_checkpoint, load_hf_tokenizer,
                       read_hf_config)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m weight",
                                     description="Import a Hugging Face model folder or a .gguf file as a project "
                                                 "checkpoint, or export a project checkpoint to either.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder or .gguf -> project checkpoint (model.pt, config.json, "
                                        "tokenizer.json)")
    imp.add_argument("src", help="folder with config.json, model.safetensors and tokenizer files, or a .gguf file")
    imp.add_argument("out", help="project checkpoint folder to write, e.g. weight/qwen")
    imp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="dtype of the saved weights; auto = as stored (config.json's torch_dtype)")
    exp = sub.add_parser("export", help="project checkpoint or LoRA adapter folder -> HF folder or .gguf file")
    exp.add_argument("src", help="checkpoint folder (weight/sft, weight/lora_merged) or LoRA adapter (weight/lora)")
    exp.add_argument("out", help=f"folder to write (config.json, model.safetensors, tokenizer.json, ...), or a "
                                 f"file ending in {SUFFIX}")
    exp.add_argument("--dtype", default="float32", choices=sorted({*DTYPES, *EXPORT_TYPES}),
                     help="dtype of the weights (q8_0: GGUF only, 8-bit blocks of 32 with one scale each)")
    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true", help="replace out as a whole (none of an old folder's "
                                                                 "files is kept)")
    args = parser.parse_args(argv)

    out, src = Path(args.out), Path(args.src)
    if out.is_file() and not args.overwrite:
        raise ValueError(f"{out} exists: add --overwrite to replace it, or choose another name")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}/ is not empty: add --overwrite to replace it, or choose another folder")
    if args.command == "import" and is_gguf_file(src):
        model, config = load_gguf_checkpoint(src, "cpu")
        with atomic_folder(out) as tmp:
            save_checkpoint(tmp, model, {k: v for k, v in config.items() if k != "model"}, load_gguf_tokenizer(src))
        print(f"import: {src} ({config['gguf']['architecture']}, {config['gguf']['tensor_types']}) -> {out}/, "
              f"weights in float32\n{model.summary()}")
        return
    if args.command == "import":
        if not is_hf_folder(src):
            raise FileNotFoundError(f"{src / 'config.json'} is missing or has no model_type: "
                                    f"not a Hugging Face model folder")
        hf = read_hf_config(src)
        dtype = DTYPES.get(args.dtype) or DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), torch.float32)
        model, config = load_hf_checkpoint(src, "cpu", dtype)
        with atomic_folder(out) as tmp:      # written aside, then swapped in: no stale file of an old folder stays
            save_checkpoint(tmp, model, {k: v for k, v in config.items() if k != "model"}, load_hf_tokenizer(src))
        print(f"import: {src}/ ({hf['model_type']}) -> {out}/, weights in {str(dtype).removeprefix('torch.')}\n"
              f"{model.summary()}")
        return
    adapter = (src / ADAPTER_CONFIG).exists()   # a LoRA adapter: folded into its base as it loads
    model, tokenizer, _, _ = load_model("" if adapter else src, src if adapter else "")
    if out.suffix == SUFFIX:
        export_gguf(model, tokenizer, out, args.dtype)      # one file, written aside and renamed into place
        print(f"export: {src} -> {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MB); run it with llama.cpp "
              f"(llama-cli -m {out}) or load it here (python inference.py --ckpt {out})")
        return
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype} is for GGUF files only: name the output {out}{SUFFIX}, or use "
                         f"one of {', '.join(DTYPES)} for a Hugging Face folder")
    with atomic_folder(out) as tmp:
        export_hf(model, tokenizer, tmp, DTYPES[args.dtype])
    kind = hf_config_from_model(model.config, tokenizer, DTYPES[args.dtype])["architectures"][0]
    print(f"export: {src}/ -> {out}/ as {kind} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main_guard(main)
