"""model.py: shapes, causality, KV cache, both flavours, sampling, config errors."""
import pytest
import torch

from engine import generate, sample_next_token
from model import GPT, IGNORE_INDEX, ModelConfig

FLAVOURS = {
    "gpt2": dict(flavour="gpt2"),
    "llama": dict(flavour="llama"),
    "llama-gqa": dict(flavour="llama", n_kv_head=2),
    "qwen2-qkv-bias": dict(flavour="llama", n_kv_head=1, qkv_bias=True, tie_embeddings=False),
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    config.update(overrides)
    return GPT(ModelConfig(**config)).eval()


@pytest.mark.parametrize("variant", FLAVOURS)
def test_forward_shapes_and_loss(variant):
    model = tiny(**FLAVOURS[variant])
    x, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    logits, none = model(x)
    assert logits.shape == (3, 16, 97) and none is None
    no_logits, loss = model(x, targets)                  # with targets: the loss only
    assert no_logits is None and loss.shape == () and torch.isfinite(loss)
    # an untrained model is close to uniform: loss near ln(97)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


@pytest.mark.parametrize("variant", FLAVOURS)
def test_changing_a_future_token_never_changes_past_logits(variant):
    model = tiny(**FLAVOURS[variant])
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12] = (x[0, 12] + 1) % 97
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


@pytest.mark.parametrize("variant", FLAVOURS)
def test_kv_cache_logits_equal_full_forward(variant):
    model = tiny(**FLAVOURS[variant])
    x = torch.randint(0, 97, (2, 24))
    full, _ = model(x)
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(x[:, a:b], kv_cache=cache)[0] for a, b in ((0, 10), (10, 11), (11, 20), (20, 24))]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_greedy_generation_same_with_and_without_cache(variant):
    model = tiny(**FLAVOURS[variant])
    prompt = torch.randint(0, 97, (2, 5))
    with_cache = model.generate(prompt, 12, temperature=0)             # model.py's short generate
    without = generate(model, prompt, 12, temperature=0, use_cache=False)   # the engine, recomputing every step
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("variant", FLAVOURS)
def test_the_head_on_scored_positions_only_gives_the_full_cross_entropy(variant):
    model = tiny(**FLAVOURS[variant])
    x, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    targets[0, :10] = IGNORE_INDEX
    targets[2, 5:] = IGNORE_INDEX
    logits, _ = model(x)                                 # every position through the head
    full = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1), reduction="none").view(3, 16)
    _, per_position = model(x, targets, reduction="none")
    assert torch.allclose(per_position, full, atol=1e-5) and (per_position[targets == IGNORE_INDEX] == 0).all()
    _, mean = model(x, targets)
    assert torch.allclose(mean, full[targets != IGNORE_INDEX].mean(), atol=1e-6)


def test_ignored_targets_do_not_count():
    model = tiny()
    x = torch.randint(0, 97, (1, 10))
    targets = x.clone()
    targets[0, :6] = IGNORE_INDEX
    _, masked = model(x, targets)
    _, per_position = model(x, x, reduction="none")
    assert torch.allclose(masked, per_position[0, 6:].mean(), atol=1e-6)


def test_generation_stops_at_stop_token():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 4))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0, stop_tokens=(first,))
    assert out.shape[1] == 5


def test_prompt_longer_than_context_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="context"):
        model.generate(torch.zeros(1, 32, dtype=torch.long), 5)


def test_generation_never_runs_past_the_context():
    model = tiny()
    out = model.generate(torch.zeros(1, 28, dtype=torch.long), 50, temperature=0)
    assert out.shape[1] == 32


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next_token(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    # probabilities ~ [0.08, 0.61, 0.23, 0.05]: top_p=0.7 keeps tokens 1 and 2 only
    picks = {sample_next_token(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    assert sample_next_token(logits, 0.0).item() == 1


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
    (dict(flavour="bert"), "unknown flavour"),
])
def test_impossible_configs_give_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


def test_config_round_trips_through_a_dict():
    config = ModelConfig(flavour="gpt2", n_layer=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.position == "learned" and config.norm == "layernorm" and config.bias


def test_gqa_has_fewer_key_value_parameters():
    full = tiny(flavour="llama").num_params()
    grouped = tiny(flavour="llama", n_kv_head=1).num_params()
    assert grouped < full


@pytest.mark.parametrize("masked", [False, True])
def test_attention_dropout_acts_in_training_only_with_or_without_a_padding_mask(masked):
    from model import Attention
    attn = Attention(ModelConfig(flavour="gpt2", n_embd=32, n_head=4, vocab_size=64, dropout=0.5), layer_idx=0)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril() if masked else None
    torch.manual_seed(0)
    a, b = attn(x, attn_mask=mask), attn(x, attn_mask=mask)
    assert not torch.allclose(a, b)                 # a fresh dropout mask each call
    attn.eval()
    torch.testing.assert_close(attn(x, attn_mask=mask), attn(x, attn_mask=mask))
