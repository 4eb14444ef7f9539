"""Checkpoint folders survive interrupted saves, and replacing a folder leaves none of its old files."""
import json
import shutil

import pytest
import torch

import full_sft
from atomic import atomic_folder
from model import GPT, ModelConfig
from weight.__main__ import main as weight_main
from weight.checkpoint import load_checkpoint, save_checkpoint

TINY = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=2, block_size=16, vocab_size=64, ffn_hidden=32)


def test_weights_and_config_of_two_different_saves_are_noticed(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a", GPT(TINY), {"step": 100})
    save_checkpoint(tmp_path / "b", GPT(TINY), {"step": 200})      # the next save of the same run
    load_checkpoint(tmp_path / "a")                                # a complete save loads
    # a kill between the renames of the next save: its weights arrived, its config.json did not
    shutil.copy(tmp_path / "b" / "model.pt", tmp_path / "a" / "model.pt")
    with pytest.raises(ValueError, match="two different saves.*--resume"):
        load_checkpoint(tmp_path / "a")


def test_a_replaced_folder_keeps_none_of_its_old_files_and_a_failed_one_keeps_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]         # no temp folder left behind


def test_export_over_a_folder_leaves_no_stale_file(tiny_pretrained, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a shard of another model")
    with pytest.raises(ValueError, match="--overwrite"):
        weight_main(["export", str(tiny_pretrained / "ckpt"), str(out)])
    weight_main(["export", str(tiny_pretrained / "ckpt"), str(out), "--overwrite"])
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"]


def test_a_hugging_face_folder_is_never_an_out_dir(tiny_pretrained, tmp_path):
    hf = tmp_path / "hf"
    weight_main(["export", str(tiny_pretrained / "ckpt"), str(hf)])
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    with pytest.raises(ValueError, match="is a Hugging Face model folder.*another --out_dir"):
        full_sft.main(["--init_from", str(hf), "--out_dir", str(hf), "--data", str(tiny_pretrained / "train.jsonl"),
                       "--max_steps", "1"])
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
