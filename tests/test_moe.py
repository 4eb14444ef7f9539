"""Mixture-of-Experts feed-forward (model.MoEFeedForward): routing, balance loss, dispatch, through the model."""
import pytest
import torch

from engine import generate

from model import GPT, FeedForward, ModelConfig, MoEFeedForward, moe_aux_loss, moe_layers


def moe_config(**overrides) -> ModelConfig:
    config = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, n_experts=4, top_k=2)
    config.update(overrides)
    return ModelConfig(**config)


def test_one_expert_with_top_1_is_the_dense_feed_forward():
    torch.manual_seed(0)
    config = moe_config(n_experts=1, top_k=1, expert_hidden=64, ffn_hidden=64)
    moe, dense = MoEFeedForward(config), FeedForward(config)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_routing_weights_of_the_chosen_experts_sum_to_one():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_experts=8, top_k=3))
    experts, weights, probs = moe.route(torch.randn(50, 32))
    assert experts.shape == weights.shape == (50, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert torch.allclose(probs.sum(-1), torch.ones(50))
    assert all(len(set(row)) == 3 for row in experts.tolist())        # three different experts per token


def test_balance_loss_is_one_at_uniform_routing_and_larger_when_skewed():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_experts=4, top_k=1))
    x = torch.randn(64, 1, 32)
    with torch.no_grad():
        moe.router.weight.zero_()                 # every probability 1/4; top-1 ties pick expert 0 ...
    moe(x)
    skewed = moe.aux_loss.item()
    assert skewed == pytest.approx(1.0)           # ... f = (1, 0, 0, 0), P = 1/4 each: E * sum f P = 1
    # a router that sends token i to expert i % 4 with probability ~1: f = P = 1/4 -> 1.0, the minimum
    one_hot = torch.eye(4).repeat(16, 1) * 20     # (64, 4) router logits
    with torch.no_grad():
        moe.router.weight.copy_(torch.linalg.lstsq(x.view(64, 32), one_hot).solution.T)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=0.05)
    # everything to one expert with certainty: the maximum, E
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 100.0
    moe(x.abs())                                  # positive inputs: expert 2's logit is far above the rest
    assert moe.aux_loss.item() == pytest.approx(4.0, abs=0.05)


def test_gradient_reaches_every_selected_expert_and_the_router():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_experts=4, top_k=2))
    x = torch.randn(3, 7, 32)
    experts, _, _ = moe.route(x.view(-1, 32))
    (moe(x).sum() + moe.aux_loss).backward()
    used = set(experts.view(-1).tolist())
    for e, expert in enumerate(moe.experts):
        got_gradient = expert.up_proj.weight.grad is not None and expert.up_proj.weight.grad.abs().sum() > 0
        assert got_gradient == (e in used)
    assert moe.router.weight.grad.abs().sum() > 0


def test_dispatch_equals_a_loop_over_tokens():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_experts=4, top_k=2, n_shared_experts=1))
    x = torch.randn(2, 6, 32)
    experts, weights, _ = moe.route(x.view(-1, 32))
    expected = torch.stack([sum(w * moe.experts[e](token) for e, w in zip(es.tolist(), ws)) + moe.shared_experts[0](token)
                            for token, es, ws in zip(x.view(-1, 32), experts, weights)])
    assert torch.allclose(moe(x).view(-1, 32), expected, atol=1e-5)


def test_capacity_factor_drops_overflow_and_counts_it():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_experts=4, top_k=1, capacity_factor=1.0))
    with torch.no_grad():
        moe.router.weight.zero_()                 # all 40 tokens pick expert 0; capacity is 10
    out = moe(torch.randn(1, 40, 32))
    assert moe.dropped == 30 and (out[0, 10:] == 0).all() and (out[0, :10] != 0).any()


def test_moe_model_trains_with_the_balance_loss_and_reports_expert_shares():
    torch.manual_seed(0)
    model = GPT(moe_config(n_shared_experts=1))
    x = torch.randint(0, 97, (2, 16))
    model.train()
    _, loss = model(x, x)
    model.eval()
    _, eval_loss = model(x, x)
    assert loss.item() == pytest.approx(eval_loss.item() + 0.01 * moe_aux_loss(model).item(), abs=1e-5)


def test_routing_log_counts_training_passes_only_and_resets_when_read():
    from training import RoutingLog
    torch.manual_seed(0)
    model = GPT(moe_config(n_shared_experts=1))
    log = RoutingLog(model)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    model.train()
    model(torch.randint(0, 97, (2, 16)))
    trained = sum(m.load.float() for m in layers)                 # (E,) routed slots of the training pass
    assert trained.sum() == 2 * 2 * 16 * 2                        # 2 layers x 32 tokens x top_k 2
    model.eval()
    model(torch.full((2, 16), 5))                 # an evaluation pass, routed differently: not counted
    assert not torch.equal(sum(m.load.float() for m in layers), trained)
    stats = log.read()
    assert stats["expert_share"] == pytest.approx((trained / trained.sum()).tolist())
    assert log.read() == {}                       # reset after reading
    log.close()


def test_moe_kv_cache_generation_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(moe_config()).eval()
    x = torch.randint(0, 97, (2, 10))
    cached = model.generate(x, 8, temperature=0.0)
    uncached = generate(model, x, 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_active_parameters_count_top_k_experts_only():
    model = GPT(moe_config(n_experts=8, top_k=2))
    per_expert = sum(p.numel() for p in moe_layers(model)[0].experts[0].parameters())
    assert model.num_params() - model.num_params(active=True) == 2 * 6 * per_expert   # 2 layers, 6 idle experts
    dense = GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32))
    # equal active parameters by default: top_k experts together as wide as the dense feed-forward
    assert abs(model.num_params(active=True) - dense.num_params()) <= 2 * 8 * 32   # router weights only


@pytest.mark.parametrize("overrides,message", [
    (dict(top_k=5), "top_k=5 must be between 1 and n_experts=4"),
    (dict(capacity_factor=-1.0), "capacity_factor must be >= 0"),
])
def test_impossible_moe_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_config(**overrides)


def test_an_architecture_flag_on_a_fine_tuning_stage_says_why_it_cannot_apply():
    import full_sft
    with pytest.raises(ValueError, match=r"--n_experts is an architecture flag.*python pretrain.py --n_experts"):
        full_sft.main(["--n_experts", "4"])


def test_pretrain_sft_and_lora_run_on_a_moe_model_and_log_expert_shares(tmp_path, capsys):
    import csv

    import full_sft
    import lora
    from conftest import pretrain_tiny, write_chat_data
    from weight.checkpoint import load_adapted_model, load_checkpoint

    pretrain_tiny(tmp_path, "pre", steps=4, eval_interval=2,
                  extra=("--n_experts", "4", "--top_k", "2", "--n_shared_experts", "1"))
    with open(tmp_path / "pre" / "log.csv") as f:
        evals = [r for r in csv.DictReader(f) if r["expert_0"]]
    assert len(evals) == 2 and all(abs(sum(float(r[f"expert_{e}"]) for e in range(4)) - 1) < 1e-4 for r in evals)
    model, _ = load_checkpoint(tmp_path / "pre")               # the checkpoint rebuilds the MoE from its config
    assert model.config.n_experts == 4 and len(moe_layers(model)) == 1
    pretrain_tiny(tmp_path, "more", steps=1, eval_interval=1, extra=("--init_from", str(tmp_path / "pre"),
                                                                    "--n_experts", "8"))
    assert "--n_experts 8 is ignored" in capsys.readouterr().out   # the checkpoint's own config wins
    assert load_checkpoint(tmp_path / "more")[0].config.n_experts == 4

    chat = write_chat_data(tmp_path, 64, 1) + ["--batch_size", "4", "--max_steps", "2", "--eval_interval", "2",
                                               "--time_budget", "0", "--max_new_tokens", "2"]
    full_sft.main(chat + ["--init_from", str(tmp_path / "pre"), "--out_dir", str(tmp_path / "sft")])
    lora.main(chat + ["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "lora"), "--replay", "0",
                      "--old_eval_data", str(tmp_path / "eval.jsonl"), "--target_modules", "up_proj", "down_proj"])
    adapter = torch.load(tmp_path / "lora" / "adapter.pt", weights_only=True)      # the routed and shared experts
    assert any(".experts." in k for k in adapter) and any(".shared_experts." in k for k in adapter)
    adapted, _ = load_adapted_model(tmp_path / "lora")                              # folded into their weights
    sft, _ = load_checkpoint(tmp_path / "sft")
    changed = [n for n, p in adapted.named_parameters() if not torch.equal(p, dict(sft.named_parameters())[n])]
    assert changed and all(n.endswith(("up_proj.weight", "down_proj.weight")) for n in changed)
