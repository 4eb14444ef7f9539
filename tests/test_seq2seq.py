"""The encoder-decoder model (model.Seq2Seq): bidirectional encoder, causal decoder, cache, padding, stages."""
import pytest
import torch

from engine import generate, left_pad
from model import ModelConfig, Seq2Seq, build_model

VARIANTS = {"llama": dict(flavour="llama", n_kv_head=2), "gpt2": dict(flavour="gpt2")}


def tiny(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    config = dict(vocab_size=97, block_size=32, n_layer=2, n_encoder_layer=2, n_head=4, n_embd=32, decoder_start_id=96)
    config.update(overrides)
    return build_model(ModelConfig(**config)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_encoder_sees_the_whole_source(variant):
    model = tiny(**VARIANTS[variant])
    src = torch.randint(0, 96, (1, 12))
    changed = src.clone()
    changed[0, 10] = (src[0, 10] + 1) % 96
    encoded, _, _ = model.encode(src)                                # (1, 12, C)
    encoded_changed, _, _ = model.encode(changed)
    # the encoder's output at position 2 depends on source token 10: no causal mask in the encoder
    assert not torch.allclose(encoded[0, 2], encoded_changed[0, 2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_decoder_stays_causal(variant):
    model = tiny(**VARIANTS[variant])
    src, tgt = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 10))
    changed = tgt.clone()
    changed[0, 7] = (tgt[0, 7] + 1) % 96
    a, _ = model(src, tgt)
    b, _ = model(src, changed)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6) and not torch.allclose(a[0, 7:], b[0, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached(variant):
    model = tiny(**VARIANTS[variant])
    src = torch.randint(0, 96, (2, 7))
    cached = model.generate(src, 12, temperature=0.0)
    uncached = generate(model, src, 12, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_sources_of_different_lengths_changes_nothing(variant):
    model = tiny(**VARIANTS[variant])
    sources = [torch.randint(0, 96, (n,)).tolist() for n in (3, 9, 6)]
    tgt = torch.randint(0, 96, (3, 5))
    src, pad_lengths = left_pad(sources, pad_id=0)
    batched, _ = model(src, tgt, pad_lengths=pad_lengths)
    for row, source in enumerate(sources):
        alone, _ = model(torch.tensor([source]), tgt[row:row + 1])
        assert torch.allclose(batched[row], alone[0], atol=1e-5)
    generated = generate(model, src, 6, temperature=0.0, pad_lengths=pad_lengths)
    for row, source in enumerate(sources):
        assert torch.equal(generated[row], model.generate(torch.tensor([source]), 6, temperature=0.0)[0])


def test_loss_counts_targets_only_and_the_model_learns_to_copy():
    torch.manual_seed(0)
    model = tiny(n_layer=1, n_encoder_layer=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):                     # copy the source: only possible by reading the encoder's output
        src = torch.randint(0, 20, (16, 6))
        tgt = torch.cat([torch.full((16, 1), 96), src[:, :-1]], dim=1)
        _, loss = model(src, tgt, targets=src)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


def test_a_checkpoint_rebuilds_the_encoder_decoder(tmp_path):
    from weight.checkpoint import load_checkpoint, save_checkpoint
    model = tiny()
    save_checkpoint(tmp_path, model, {"stage": "pretrain"})
    loaded, _ = load_checkpoint(tmp_path)
    src, tgt = torch.randint(0, 96, (1, 5)), torch.randint(0, 96, (1, 4))
    assert isinstance(loaded, Seq2Seq) and torch.equal(loaded.eval()(src, tgt)[0], model(src, tgt)[0])


def test_an_encoder_decoder_chatbot_through_every_stage(tmp_path, capsys):
    """pretrain (next span) -> full_sft (conversation in, answer out) -> evaluation -> inference -> LoRA; DPO says no."""
    import dpo
    import evaluation
    import full_sft
    import inference
    import lora
    from conftest import pretrain_tiny, write_chat_data
    from weight.checkpoint import load_checkpoint

    pretrain_tiny(tmp_path, "pre", steps=3, eval_interval=3, extra=("--n_encoder_layer", "1", "--sample_tokens", "5"))
    model, _ = load_checkpoint(tmp_path / "pre")
    assert isinstance(model, Seq2Seq) and model.config.decoder_start_id == 320 - 3    # <|endoftext|>
    chat = write_chat_data(tmp_path, 64, 1) + ["--batch_size", "4", "--max_steps", "2", "--eval_interval", "2",
                                               "--time_budget", "0", "--max_new_tokens", "3"]
    full_sft.main(chat + ["--init_from", str(tmp_path / "pre"), "--out_dir", str(tmp_path / "sft")])
    choice = tmp_path / "mc.jsonl"
    choice.write_text('{"context": "apple ", "options": ["APPLE", "bread"], "answer": 0}\n'
                      '{"messages": [{"role": "user", "content": "Who?"}], "options": ["a", "bc"], "answer": 1}\n')
    evaluation.main(["--ckpt", str(tmp_path / "sft"), "--data", str(tmp_path / "eval.jsonl"), "--choice_data",
                     str(choice), "--max_new_tokens", "3", "--out", str(tmp_path / "report.json")])
    assert '"choice"' in (tmp_path / "report.json").read_text()
    # inference.py continues a text with an encoder-decoder (the prompt goes to the encoder). An untrained,
    # untied model: its greedy tokens are arbitrary ones (a tied one just repeats its start token, <|endoftext|>)
    from weight.checkpoint import load_checkpoint_tokenizer, save_checkpoint
    tok = load_checkpoint_tokenizer(tmp_path / "pre")
    torch.manual_seed(1)
    untrained = build_model(ModelConfig(**{**model.config.to_dict(), "tie_embeddings": False})).eval()
    save_checkpoint(tmp_path / "untrained", untrained, {"stage": "pretrain"}, tok)
    capsys.readouterr()
    inference.main(["--ckpt", str(tmp_path / "untrained"), "--prompt", "apple", "--max_new_tokens", "4",
                    "--temperature", "0", "--repetition_penalty", "1", "--min_p", "0"])
    expected = untrained.generate(torch.tensor([tok.encode_ordinary("apple")]), 4, temperature=0.0)[0]
    assert tok.im_end_id not in expected and tok.eot_id not in expected
    assert capsys.readouterr().out.strip() == ("apple" + tok.decode(expected)).strip()
    lora.main(chat + ["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "lora"), "--replay", "0",
                      "--old_eval_data", str(tmp_path / "eval.jsonl")])
    with pytest.raises(ValueError, match="is an encoder-decoder model: dpo.py"):
        dpo.main(["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "dpo")])
    import distill
    import grpo
    import verifier
    for stage, main, extra in (("grpo.py", grpo.main, []), ("verifier.py", verifier.main, []),
                               ("distill.py", distill.main, ["--teacher", str(tmp_path / "sft")])):
        with pytest.raises(ValueError, match=f"is an encoder-decoder model: {stage} reads a prompt and its answer"):
            main(["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / stage), *extra])


def test_an_objective_that_does_not_fit_the_model_is_refused(tmp_path):
    import pretrain
    with pytest.raises(ValueError, match="--objective next_span does not fit a decoder-only model"):
        pretrain.main(["--objective", "next_span", "--out_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--objective next_token does not fit an encoder-decoder model"):
        pretrain.main(["--objective", "next_token", "--n_encoder_layer", "2", "--out_dir", str(tmp_path)])


def test_muon_trains_the_encoders_matrices_too():
    from optim import make_optimizer
    from training import TrainConfig
    model = build_model(ModelConfig(vocab_size=64, n_layer=1, n_encoder_layer=1, n_embd=32, n_head=2))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    in_muon = {id(p) for group in optimizer.optimizers[1].param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_muon}
    assert "encoder.0.attn.q_proj.weight" in names and "blocks.0.cross_attn.q_proj.weight" in names
    assert "tok_emb.weight" not in names
