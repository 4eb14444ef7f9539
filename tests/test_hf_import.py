"""Public weights in and out (weight/hf.py): tiny random transformers models, imported, must compute
exactly what transformers computes; exported, must load back in transformers with the same logits."""
import json
from pathlib import Path

import pytest
import torch

from engine import generate

transformers = pytest.importorskip("transformers")

from hf_helpers import MIXED, write_toy_tokenizer  # noqa: E402
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer  # noqa: E402
from weight import __main__ as convert  # noqa: E402  (python -m weight)
from weight import hf  # noqa: E402

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SMALL = dict(max_position_embeddings=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)
ARCHS = {
    # name: (tokenizer style, special tokens, model config class, config kwargs)
    "gpt2": ("gpt2", CHATML[:1], "GPT2Config", dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "qwen2-gqa-tied": ("qwen2", CHATML, "Qwen2Config", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                                            rope_theta=1e6, padded_rows=5)),
    "qwen2-untied": ("qwen2", CHATML, "Qwen2Config", dict(SMALL, num_key_value_heads=1, tie_word_embeddings=False)),
    "llama-gqa-untied": ("qwen2", CHATML, "LlamaConfig", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
}


def make_hf_folder(folder, arch: str, seed: int = 0, specials=None, chat_template: str | None = None):
    """A random transformers model of `arch` + a toy tokenizer, saved as a model folder would be.
    specials / chat_template: the tokenizer's own special tokens (the first one ends a text) and template."""
    style, arch_specials, config_class, kwargs = ARCHS[arch]
    specials, kwargs = specials or arch_specials, dict(kwargs)
    n_tokens = write_toy_tokenizer(folder, style, specials=specials, chat_template=chat_template,
                                   tokenizer_class="GPT2Tokenizer" if style == "gpt2" else "Qwen2Tokenizer")
    eot = n_tokens - len(specials)
    config = getattr(transformers, config_class)(vocab_size=n_tokens + kwargs.pop("padded_rows", 0),
                                                 bos_token_id=eot, eos_token_id=eot, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():   # random, not-small biases and norm weights, so a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    model.save_pretrained(folder)
    return model.eval(), eot


@pytest.fixture(scope="module", params=list(ARCHS))
def imported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    theirs, eot = make_hf_folder(folder, request.param)
    ours, config = load_checkpoint(folder)
    return dict(arch=request.param, folder=folder, theirs=theirs, ours=ours.eval(), config=config, eot=eot,
                tokenizer=load_checkpoint_tokenizer(folder))


def test_logits_equal_transformers(imported):
    theirs, ours = imported["theirs"], imported["ours"]
    ids = torch.randint(0, theirs.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids)[0]
    V = expected.shape[-1]
    torch.testing.assert_close(got[..., :V], expected, atol=1e-5, rtol=1e-5)
    assert imported["config"]["model"]["block_size"] == 64


def test_greedy_generation_equals_transformers(imported):
    theirs, ours, eot = imported["theirs"], imported["ours"], imported["eot"]
    prompt = torch.tensor([imported["tokenizer"].encode_ordinary("Hello world! 我们")])
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    got = generate(ours, prompt, 12, temperature=0.0, stop_tokens=(eot,))
    assert got.tolist() == expected.tolist()


def test_chat_tokens_are_the_models_own_or_added_after_its_rows(imported):
    tok, ours, theirs = imported["tokenizer"], imported["ours"], imported["theirs"]
    rows = theirs.config.vocab_size
    assert tok.vocab_size == ours.config.vocab_size
    if imported["arch"] == "gpt2":   # GPT-2 has no ChatML tokens: two new ids, their rows the mean row
        assert (tok.im_start_id, tok.im_end_id) == (rows, rows + 1)
        mean = theirs.transformer.wte.weight.mean(0)
        torch.testing.assert_close(ours.tok_emb.weight[rows:], torch.stack([mean, mean]))
    else:                            # Qwen's own ids; padded rows get placeholder names
        assert tok.im_end_id == tok.eot_id + 2 < rows and tok.vocab_size == rows


def test_export_loads_in_transformers_with_the_same_logits_and_ids(imported, tmp_path):
    ours, tok = imported["ours"], imported["tokenizer"]
    hf.export_hf(ours, tok, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == type(imported["theirs"]).__name__
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert back_tok(MIXED)["input_ids"] == tok.encode_ordinary(MIXED)


def test_weights_load_in_the_dtype_asked_for(imported):
    model = hf.load_hf_model(imported["folder"], dtype=torch.bfloat16,
                             vocab_size=imported["ours"].config.vocab_size)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0].float(), imported["ours"](ids)[0], atol=0.1, rtol=0.05)


# --- folders: shards, the converter command, fine-tuning ------------------------------

def test_sharded_weights_load_like_one_file(tmp_path):
    theirs, _ = make_hf_folder(tmp_path / "one", "qwen2-untied")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    one, sharded = load_checkpoint(tmp_path / "one")[0], load_checkpoint(tmp_path / "sharded")[0]
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_gpt2_files_of_the_original_release_load_too(tmp_path):
    # openai-community/gpt2 names tensors without "transformer." and keeps the causal-mask buffers
    from safetensors.torch import load_file, save_file
    theirs, _ = make_hf_folder(tmp_path, "gpt2")
    state = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_checkpoint(tmp_path)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids)[0][..., :expected.shape[-1]], expected, atol=1e-5, rtol=1e-5)


def test_import_command_writes_a_checkpoint_that_reloads(tmp_path, capsys):
    make_hf_folder(tmp_path / "hf", "gpt2")
    convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "bfloat16"])
    assert "import:" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)["tok_emb.weight"].dtype == torch.bfloat16
    model, config = load_checkpoint(tmp_path / "ckpt")
    direct = hf.load_hf_model(tmp_path / "hf", dtype=torch.bfloat16, vocab_size=model.config.vocab_size)
    assert torch.equal(model.tok_emb.weight, direct.tok_emb.weight.float())
    tok = load_checkpoint_tokenizer(tmp_path / "ckpt")
    from_folder = load_checkpoint_tokenizer(tmp_path / "hf")
    assert tok.fingerprint == config["tokenizer"]["fingerprint"] == from_folder.fingerprint


def test_sft_lora_dpo_and_chat_on_an_imported_qwen_folder_and_export(tmp_path):
    import random
    import subprocess
    import sys

    import dpo
    import full_sft
    import lora
    from conftest import WORDS
    from data.chat_data import (generate_chat_data, plausible_wrong_answer, preference_pair, synthetic_names,
                                write_jsonl)
    from weight.checkpoint import load_adapted_model
    make_hf_folder(tmp_path / "qwen", "qwen2-gqa-tied")
    train, held_out = generate_chat_data(WORDS, 60, 1, seed=0)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    data = ["--data", str(tmp_path / "train.jsonl"), "--eval_data", str(tmp_path / "eval.jsonl"),
            "--max_steps", "2", "--eval_interval", "2", "--time_budget", "0", "--batch_size", "4",
            "--max_new_tokens", "2"]
    full_sft.main(["--init_from", str(tmp_path / "qwen"), "--out_dir", str(tmp_path / "sft"), *data])
    lora.main(["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "lora"), "--replay", "0",
               "--old_eval_data", str(tmp_path / "eval.jsonl"), *data])
    lora.main(["--init_from", str(tmp_path / "qwen"), "--out_dir", str(tmp_path / "lora_on_hf"), "--replay", "0", *data])
    assert json.loads((tmp_path / "lora_on_hf" / "metrics.json").read_text())["adapter_fraction"] < 1
    rng = random.Random(0)
    pairs = [preference_pair(r, w) for r in train if (w := plausible_wrong_answer(r, rng, WORDS, synthetic_names()))]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    dpo.main(["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "dpo"), "--data",
              str(tmp_path / "pairs.jsonl"), "--eval_data", str(tmp_path / "pairs.jsonl"), "--task_data",
              str(tmp_path / "eval.jsonl"), *data[4:]])
    assert 0 <= json.loads((tmp_path / "dpo" / "metrics.json").read_text())["preference_accuracy"] <= 1
    start, tuned = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("sft", "dpo"))
    assert any(not torch.equal(start[k], tuned[k]) for k in start)          # DPO trained the imported model
    # inference.py chats with the folder itself, through Qwen's own template
    chat = subprocess.run([sys.executable, "inference.py", "--init_from", str(tmp_path / "qwen"), "--prompt", "hi",
                           "--max_new_tokens", "3", "--temperature", "0"],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    sft, _ = load_checkpoint(tmp_path / "sft")
    merged = load_adapted_model(tmp_path / "lora")[0]       # the adapter folded into its base
    ids = torch.randint(0, sft.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    for model, src in ((sft, "sft"), (merged, "lora")):
        convert.main(["export", str(tmp_path / src), str(tmp_path / f"{src}-hf")])
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{src}-hf").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model.eval()(ids)[0], atol=1e-5, rtol=1e-5)


# --- bad input: one clear line -------------------------------------------------------

@pytest.fixture
def qwen_folder(tmp_path):
    make_hf_folder(tmp_path, "qwen2-untied")
    return tmp_path


def test_missing_config_is_named(qwen_folder):
    (qwen_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.load_hf_checkpoint(qwen_folder)


def test_missing_weights_are_named_and_pickles_refused(qwen_folder):
    (qwen_folder / "model.safetensors").rename(qwen_folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors .*pytorch_model.bin is a pickle file"):
        hf.load_hf_checkpoint(qwen_folder)


def test_missing_tokenizer_files_are_named(qwen_folder):
    (qwen_folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer: expected tokenizer.json"):
        load_checkpoint_tokenizer(qwen_folder)


def test_a_missing_shard_is_named(tmp_path):
    theirs, _ = make_hf_folder(tmp_path, "qwen2-untied")
    (tmp_path / "model.safetensors").unlink()
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {shard.name}, which is not in"):
        load_checkpoint(tmp_path)


def test_an_unknown_model_type_names_the_supported_ones(qwen_folder):
    config = json.loads((qwen_folder / "config.json").read_text())
    (qwen_folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported; supported: gpt2"):
        load_checkpoint(qwen_folder)


def test_a_tokenizer_bigger_than_the_weights_is_refused(qwen_folder):
    write_toy_tokenizer(qwen_folder, "qwen2", vocab_size=400, specials=CHATML)
    with pytest.raises(ValueError, match="the tokenizer has 4.. tokens but the weights have 3.. embedding rows"):
        load_checkpoint_tokenizer(qwen_folder)


def test_a_tokenizer_of_another_model_is_refused(qwen_folder):
    write_toy_tokenizer(qwen_folder, "qwen2", vocab_size=280, specials=CHATML)   # fits, but its ids differ
    with pytest.raises(ValueError, match="eos_token_id 300 is not a special token of the tokenizer files"):
        load_checkpoint(qwen_folder)


def test_not_enough_memory_is_said_before_loading(qwen_folder, monkeypatch):
    monkeypatch.setattr(hf, "available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"0.00B parameters need 0.0 GiB in float32, but only 0.0 GiB is free"):
        hf.load_hf_checkpoint(qwen_folder)


def test_config_and_weights_that_disagree_are_refused(qwen_folder):
    config = json.loads((qwen_folder / "config.json").read_text())
    (qwen_folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="blocks.0.ffn.gate_proj.weight should be .64, 32. for this config.json"):
        load_checkpoint(qwen_folder)


def test_a_model_with_no_hf_architecture_is_not_exported(tmp_path):
    from model import GPT, ModelConfig
    model = GPT(ModelConfig(flavour="llama", mlp="gelu", vocab_size=300, n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="a llama model with {'mlp': 'gelu'} has no Hugging Face architecture"):
        hf.export_hf(model, None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_made_by_pretrain_exports(tmp_path):
    """pretrain.py's own checkpoints (own BPE tokenizer, decoder only) go out as a folder transformers loads."""
    from conftest import pretrain_tiny
    ckpt = pretrain_tiny(tmp_path, extra=("--flavour", "llama"))
    convert.main(["export", str(ckpt), str(tmp_path / "hf")])
    ours, _ = load_checkpoint(ckpt)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours.eval()(ids)[0], atol=1e-5, rtol=1e-5)


# --- a folder's own chat template: ChatML is used as it is, any other is refused for chat ------

# Llama-3's template (meta-llama/Meta-Llama-3-8B-Instruct): headers and <|eot_id|>, no ChatML
LLAMA3_SPECIALS = ("<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# SmolLM2's (HuggingFaceTB/SmolLM2-135M-Instruct, a Llama): ChatML with its own tokens and a default system
# message; its newlines are real ones in the Jinja text, Qwen2.5's are written "\n"
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
HI = [{"role": "user", "content": "hi"}]


def make_llama3_folder(folder, where: str = "tokenizer_config.json"):
    """A tiny Llama with Llama-3's special tokens and chat template, the template kept where `where` says:
    tokenizer_config.json (as a string, or as a list of named templates) or chat_template.jinja (newer
    transformers save it there)."""
    make_hf_folder(folder, "llama-gqa-untied", specials=LLAMA3_SPECIALS,
                   chat_template=LLAMA3_TEMPLATE if where == "tokenizer_config.json" else None)
    config_path = folder / "tokenizer_config.json"
    if where == "named list":
        config = json.loads(config_path.read_text())
        config["chat_template"] = [{"name": "default", "template": LLAMA3_TEMPLATE},
                                   {"name": "tool_use", "template": LLAMA3_TEMPLATE}]
        config_path.write_text(json.dumps(config))
    elif where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    return folder


@pytest.mark.parametrize("where", ["tokenizer_config.json", "named list", "chat_template.jinja"])
def test_a_folder_with_its_own_non_chatml_template_is_refused_for_chat(tmp_path, where):
    from tokenizer.chat import render_chat
    folder = make_llama3_folder(tmp_path / "llama3", where)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok = load_checkpoint_tokenizer(folder)
    model, config = load_checkpoint(folder)
    # no ChatML tokens slipped in, no new mean-initialised rows
    assert "<|im_start|>" not in tok.special_ids and tok.vocab_size == model.config.vocab_size == rows
    assert config["hf"]["chat_template"]          # so inference's --chat auto tries chat, and is refused
    source = folder / ("chat_template.jinja" if where == "chat_template.jinja" else "tokenizer_config.json")
    with pytest.raises(ValueError, match=f"^{source}: .*own chat template, not ChatML.*--chat off") as refusal:
        render_chat(HI, tok, add_generation_prompt=True)
    assert "\n" not in str(refusal.value)
    # the refusal travels with the tokenizer: a checkpoint imported from the folder refuses the same way
    convert.main(["import", str(folder), str(tmp_path / "ckpt")])
    with pytest.raises(ValueError, match="own chat template, not ChatML"):
        render_chat(HI, load_checkpoint_tokenizer(tmp_path / "ckpt"))
    # text continuation is what the model does here: same ids and greedy tokens as transformers
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([tok.encode_ordinary("Hello world! 我们")])
    expected = theirs.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=tok.eot_id,
                               pad_token_id=tok.eot_id)
    assert generate(model.eval(), prompt, 8, temperature=0.0, stop_tokens=(tok.eot_id,)).tolist() == expected.tolist()


def test_chat_commands_on_a_non_chatml_folder_say_so_in_one_line(tmp_path):
    import subprocess
    import sys
    from conftest import write_chat_data
    folder = make_llama3_folder(tmp_path / "llama3")
    data = write_chat_data(tmp_path, n_train=8, n_eval_per_family=1)
    root = Path(__file__).parent.parent

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300)

    sft = run("full_sft.py", "--init_from", str(folder), "--out_dir", str(tmp_path / "sft"), *data,
              "--max_steps", "1", "--eval_interval", "1", "--time_budget", "0", "--batch_size", "2",
              "--max_new_tokens", "2")
    chat = run("inference.py", "--init_from", str(folder), "--prompt", "hi", "--max_new_tokens", "3")
    for result in (sft, chat):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'tokenizer_config.json'}: "), lines
        assert "not ChatML" in lines[0] and "--chat off" in lines[0] and "full_sft.py --init_from" in lines[0]
    assert not (tmp_path / "sft" / "model.pt").exists()
    # what the line offers: text continuation works
    text = run("inference.py", "--init_from", str(folder), "--prompt", "hi", "--max_new_tokens", "3",
               "--temperature", "0", "--chat", "off")
    assert text.returncode == 0 and text.stdout.strip(), text.stderr


def test_a_copy_without_the_template_is_a_base_model_that_learns_chatml(tmp_path):
    """What the refusal offers: the folder without its template gets <|im_start|>/<|im_end|> added."""
    import shutil

    import full_sft
    from conftest import write_chat_data
    from tokenizer.chat import render_chat
    folder = make_llama3_folder(tmp_path / "llama3")
    copy = Path(shutil.copytree(folder, tmp_path / "llama3-chatml"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    rows = json.loads((copy / "config.json").read_text())["vocab_size"]
    tok = load_checkpoint_tokenizer(copy)
    assert (tok.im_start_id, tok.im_end_id) == (rows, rows + 1)
    assert render_chat(HI, tok, add_generation_prompt=True)[0][0] == rows
    data = write_chat_data(tmp_path, n_train=8, n_eval_per_family=1)
    full_sft.main(["--init_from", str(copy), "--out_dir", str(tmp_path / "sft"), *data, "--max_steps", "1",
                   "--eval_interval", "1", "--time_budget", "0", "--batch_size", "2", "--max_new_tokens", "2"])
    assert load_checkpoint(tmp_path / "sft")[0].config.vocab_size == rows + 2


def test_a_llama_folder_with_a_chatml_template_chats_as_its_template_says(tmp_path):
    """SmolLM2: a Llama whose template is ChatML with its own tokens: used as it is, default system message too."""
    from tokenizer.chat import render_chat
    folder = tmp_path / "smollm2"
    make_hf_folder(folder, "llama-gqa-untied", chat_template=SMOLLM2_TEMPLATE)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok = load_checkpoint_tokenizer(folder)
    assert tok.vocab_size == rows and tok.im_end_id < rows          # its own tokens, nothing added
    assert tok.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (HI, [{"role": "system", "content": "Be brief."}, *HI]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert render_chat(messages, tok, add_generation_prompt=True)[0] == expected
