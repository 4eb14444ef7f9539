"""LoRA: the layer math, adapter-only saving, merge, and lora.py end to end on a tiny model."""
import json
from pathlib import Path

import pytest
import torch

import full_sft
import lora
from data.chat_data import generate_chat_data, write_jsonl
from lora import LoRALinear, add_lora, lora_state_dict, merge_lora
from model import GPT, ModelConfig

from conftest import WORDS


def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, flavour="llama"))


def test_with_b_zero_the_adapted_model_equals_the_base_exactly():
    model = tiny_model()
    x = torch.randint(64, (2, 10))
    before, _ = model(x)
    add_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    after, _ = model(x)
    assert torch.equal(before, after)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_model()
    x = torch.randint(64, (2, 10))
    base_out, _ = model(x)
    add_lora(model, ["q_proj", "up_proj"], rank=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)                 # pretend it was trained
    adapted, _ = model(x)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    base_weights = [m.base.weight.clone() for m in layers]
    for m in layers:
        m.merge()
    merged, _ = model(x)
    assert torch.allclose(merged, adapted, atol=1e-5) and not torch.allclose(adapted, base_out, atol=1e-3)
    for m in layers:
        m.unmerge()                                                   # W back, the adapter beside it again
    assert all(torch.allclose(m.base.weight, w, atol=1e-6) for m, w in zip(layers, base_weights))
    assert torch.allclose(model(x)[0], adapted, atol=1e-5)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x)[0], adapted, atol=1e-5)


def test_adapter_state_holds_only_the_low_rank_factors():
    model = tiny_model()
    add_lora(model, ["q_proj"], rank=2, alpha=4)
    state = lora_state_dict(model)
    assert set(state) == {f"blocks.{i}.attn.q_proj.lora_{ab}" for i in range(2) for ab in "AB"}
    assert state["blocks.0.attn.q_proj.lora_A"].shape == (2, 16)


def test_unknown_target_modules_are_one_clear_line():
    with pytest.raises(ValueError, match="matched no linear layer; choose from"):
        add_lora(tiny_model(), ["qkv"], rank=2, alpha=4)


def test_lora_trains_an_adapter_and_merges(tiny_pretrained, tmp_path):
    sft = tmp_path / "sft"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
                   "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(sft), "--max_steps", "3",
                   "--eval_interval", "3", "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "2"])
    train, held_out = generate_chat_data(WORDS, 40, 2, seed=3, families=("first",))
    write_jsonl(tmp_path / "skill.jsonl", train)
    write_jsonl(tmp_path / "skill_eval.jsonl", held_out)
    out = tmp_path / "lora"
    args = ["--init_from", str(sft), "--data", str(tmp_path / "skill.jsonl"),
            "--eval_data", str(tmp_path / "skill_eval.jsonl"), "--old_eval_data", str(tiny_pretrained / "eval.jsonl"),
            "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "2", "--time_budget", "0",
            "--batch_size", "4", "--max_new_tokens", "2", "--rank", "2", "--replay", "0"]
    lora.main(args)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".json")) == \
        ["adapter.pt", "adapter_config.json", "metrics.json", "resume.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("new_skill_accuracy", "old_skills_accuracy", "accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["accuracy_by_family"]) >= {"first"}           # the new skill is scored per family too
    # the trainable share is what the adapter file holds: rank 2 x (in + out) of every adapted layer
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert metrics["trainable_params"] == sum(t.numel() for t in adapter.values())
    # resume.pt keeps what trains (the adapters), not the frozen base the stage reads again from --init_from
    resumable = torch.load(out / "resume.pt", weights_only=True)["model"]
    assert sorted(resumable) == sorted(k for k in resumable if ".lora_" in k) and len(resumable) == len(adapter)
    assert 0 < metrics["trainable_fraction"] < 0.5

    lora.main(args[:args.index("--out_dir") + 2] + ["--merge"])
    adapted, _ = lora.load_adapted_model(out)
    from weight.checkpoint import load_checkpoint
    merged, _ = load_checkpoint(str(out) + "_merged")
    x = torch.randint(merged.config.vocab_size, (1, 12))
    assert torch.allclose(adapted(x)[0], merged(x)[0], atol=1e-5)
    with pytest.raises(ValueError, match="--force"):
        lora.main(args[:args.index("--out_dir") + 2] + ["--merge"])
    (Path(str(out) + "_merged") / "stale.safetensors").write_bytes(b"from an older merge")
    lora.main(args[:args.index("--out_dir") + 2] + ["--merge", "--force"])     # the folder replaced as a whole
    assert not (Path(str(out) + "_merged") / "stale.safetensors").exists()
    assert torch.allclose(load_checkpoint(str(out) + "_merged")[0](x)[0], merged(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="already holds an adapter"):
        lora.main(args)

    # the same adapter pointed at another base (same shapes, other weights) is refused
    config = json.loads((out / "adapter_config.json").read_text())
    config["init_from"] = str(tiny_pretrained / "ckpt")
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another base model"):
        lora.load_adapted_model(out)
