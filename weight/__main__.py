"""
python -m weight -- public weights in and out of the project's checkpoint folders.

    python -m weight import /models/Qwen2.5-0.5B-Instruct weight/qwen   # Hugging Face folder -> checkpoint
    python -m weight export weight/sft /tmp/sft-hf                      # checkpoint -> Hugging Face folder
    python -m weight export weight/lora /tmp/lora-hf                    # a LoRA adapter, folded into its base

The formats are weight/hf.py's; the checkpoint folders are weight/checkpoint.py's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atomic import atomic_folder
from flags import main_guard
from weight.checkpoint import ADAPTER_CONFIG, load_model, save_checkpoint
from weight.hf import (DTYPES, export_hf, hf_config_from_model, is_hf_folder, load_hf_checkpoint, load_hf_tokenizer,
                       read_hf_config)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m weight",
                                     description="Import a Hugging Face model folder as a project checkpoint, "
                                                 "or export a project checkpoint to a Hugging Face folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder -> project checkpoint (model.pt, config.json, tokenizer.json)")
    imp.add_argument("src", help="folder with config.json, model.safetensors and tokenizer files")
    imp.add_argument("out", help="project checkpoint folder to write, e.g. weight/qwen")
    imp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="dtype of the saved weights; auto = as stored (config.json's torch_dtype)")
    exp = sub.add_parser("export", help="project checkpoint or LoRA adapter folder -> HF folder")
    exp.add_argument("src", help="checkpoint folder (weight/sft, weight/lora_merged) or LoRA adapter (weight/lora)")
    exp.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer.json, ...)")
    exp.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of model.safetensors")
    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true", help="replace the folder out as a whole (none of its "
                                                                 "old files is kept)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}/ is not empty: add --overwrite to replace it, or choose another folder")
    src = Path(args.src)
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
    with atomic_folder(out) as tmp:
        export_hf(model, tokenizer, tmp, DTYPES[args.dtype])
    kind = hf_config_from_model(model.config, tokenizer, DTYPES[args.dtype])["architectures"][0]
    print(f"export: {src}/ -> {out}/ as {kind} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main_guard(main)
