"""pretrain.py + training.py end to end on a tiny config: outputs, resume, DDP, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from data.pretrain_data import TokenBin
from optim import lr_at
from training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog. 春眠不觉晓，处处闻啼鸟。\n"
               for i in range(400))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def tiny_args(corpus, out_dir, *extra):
    return ["--data", str(corpus / "text.txt"), "--tokenizer", str(corpus / "tok.json"), "--vocab_size", "300",
            "--cache_dir", str(corpus / "cache"), "--out_dir", str(out_dir), "--n_layer", "2", "--n_embd", "32",
            "--n_head", "2", "--block_size", "32", "--batch_size", "4", "--max_steps", "12",
            "--eval_interval", "4", "--eval_tokens", "256", "--warmup_steps", "2", "--sample_tokens", "0",
            "--time_budget", "0", *extra]   # no clock in the schedule: runs repeat exactly


def test_pretrain_writes_every_output(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("model.pt", "config.json", "metrics.json", "log.csv", "loss.png", "tokenizer.json", "resume.pt"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_bpb", "val_loss", "params", "tokens", "tokens_per_second", "seconds"):
        assert metrics[key] is not None, key
    assert metrics["tokens"] == 12 * 4 * 32
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["tokenizer"]["vocab_size"] == 300


def test_training_lowers_the_validation_loss(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--max_steps", "40", "--eval_interval", "40", "--lr", "1e-2"))
    rows = [line.split(",") for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    val = [float(r[5]) for r in rows if r[5]]
    assert val[-1] < val[0] - 1.0


def test_kill_and_resume_gives_the_same_result_as_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    pretrain.main(tiny_args(corpus, tmp_path / "straight", "--dropout", "0.1"))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())

    # crash in the middle of step 10: the last resumable state is the one saved at step 8
    original, calls = TokenBin.random_batch, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenBin, "random_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.main(tiny_args(corpus, tmp_path / "resumed", "--dropout", "0.1"))
    monkeypatch.setattr(TokenBin, "random_batch", original)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    pretrain.main(tiny_args(corpus, tmp_path / "resumed", "--dropout", "0.1", "--resume"))
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())

    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "resumed" / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps), "log.csv has no duplicated rows after resuming"


# Launched by torchrun in place of pretrain.py: runs pretrain.py's main unchanged, and saves this process's
# weights as training starts and as it ends (to $RANK_WEIGHTS_DIR, a variable only this test sets), so the
# test can compare the processes' copies of the model. The stage itself is not changed for users.
RANK_WEIGHTS_WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import pretrain

folder, rank, train = os.environ["RANK_WEIGHTS_DIR"], os.environ["RANK"], pretrain.run_training

def run_training(model, *args, **kwargs):
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, f"{{folder}}/initial{{rank}}.pt")
    result = train(model, *args, **kwargs)
    torch.save(model.state_dict(), f"{{folder}}/final{{rank}}.pt")
    return result

pretrain.run_training = run_training
pretrain.main(sys.argv[1:])
"""


def test_two_process_gloo_ddp_trains(corpus, tmp_path):
    out = tmp_path / "ddp"
    wrapper = tmp_path / "pretrain_saving_rank_weights.py"
    wrapper.write_text(RANK_WEIGHTS_WRAPPER.format(root=str(ROOT)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(wrapper), *tiny_args(corpus, out, "--max_steps", "6", "--device", "cpu",
                                    "--time_budget", "600")]   # the processes share one clock
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["tokens"] == 2 * 6 * 4 * 32   # two processes, each its own batches

    # data parallel: each process trains on its own batches, the gradients are averaged, so after every
    # step both hold exactly the same weights -- and training moved every one of them
    initial, rank0, rank1 = (torch.load(tmp_path / name, weights_only=True)
                             for name in ("initial0.pt", "final0.pt", "final1.pt"))
    assert rank0.keys() == rank1.keys() == initial.keys()
    unequal = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not unequal, f"the two processes' weights differ after training: {unequal}"
    unchanged = [k for k in rank0 if torch.equal(rank0[k], initial[k])]
    assert not unchanged, f"training did not change {unchanged}"


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra,message", [
    (["--n_embd", "30", "--n_head", "4"], "not divisible by n_head"),
    (["--n_head", "4", "--n_kv_head", "3"], "not divisible by n_kv_head"),
])
def test_impossible_model_config_is_one_clear_line(corpus, tmp_path, extra, message):
    result = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "x"), *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_corpus_file_is_one_clear_line(tmp_path):
    result = run_cli("pretrain.py", "--data", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "missing.txt: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_refused_by_argparse(tmp_path):
    result = run_cli("pretrain.py", "--n_layers", "3")
    assert result.returncode == 2 and "unrecognized arguments: --n_layers" in result.stderr


def test_time_budget_stops_early_and_finishes_the_schedule(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--max_steps", "1000", "--time_budget", "1e-9"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 1                       # the first step already used up the budget
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=1000, time_budget=100.0)
    assert lr_at(10, cfg, seconds=50.0) == pytest.approx(0.55)   # half the time = half the cosine
    assert lr_at(10, cfg, seconds=100.0) == pytest.approx(0.1)


def test_muon_trains_and_resumes(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--optimizer", "muon", "--lr", "1e-2"))
    rows = [line.split(",") for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    val = [float(r[5]) for r in rows if r[5]]
    assert val[-1] < val[0]
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert len(state["optimizer"]["optimizers"]) == 2      # AdamW + Muon, both saved for --resume
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--optimizer", "muon", "--lr", "1e-2",
                            "--max_steps", "16", "--resume"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 16


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_orthogonalize_pushes_singular_values_towards_one(shape):
    from optim import orthogonalize
    # G = U diag(sigma) V^T with singular values spread over a factor of 100
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    G = 5 * U[:, :k] @ torch.diag(torch.logspace(-2, 0, k)) @ V[:, :k].T
    O = orthogonalize(G)
    assert O.shape == G.shape
    s = torch.linalg.svdvals(O.float())
    assert s.min() > 0.5 and s.max() < 1.3           # Newton-Schulz lands near 1, not exactly on it
    # and the singular vectors are kept: O is close to U V^T
    R = U[:, :k] @ V[:, :k].T
    assert (O.float() - R).norm() / R.norm() < 0.3


def test_a_second_fresh_run_never_replaces_a_trained_model(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run"))
    before = (tmp_path / "run" / "model.pt").read_bytes()
    result = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "run"))
    assert result.returncode == 2 and "--overwrite" in result.stderr and "--resume" in result.stderr
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--overwrite"))     # asked for: allowed


def test_resume_with_other_model_flags_is_one_clear_line(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run"))
    result = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "run", "--n_embd", "64", "--resume"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--n_embd 64" in result.stderr and "started with --n_embd 32" in result.stderr


def crash_at_batch(monkeypatch, n: int):
    """The n-th training batch raises, as a kill would stop the run there."""
    original, calls = TokenBin.random_batch, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(TokenBin, "random_batch", crashing)
    return lambda: monkeypatch.setattr(TokenBin, "random_batch", original)


def test_resume_takes_the_runs_own_data_tokenizer_and_model_flags(corpus, tmp_path, monkeypatch, capsys):
    pretrain.main(tiny_args(corpus, tmp_path / "straight", "--lr", "3e-3"))
    restore = crash_at_batch(monkeypatch, 11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.main(tiny_args(corpus, tmp_path / "resumed", "--lr", "3e-3"))
    restore()
    pretrain.main(["--out_dir", str(tmp_path / "resumed"), "--resume"])      # nothing else repeated
    assert "--data " + str(corpus / "text.txt") in capsys.readouterr().out
    straight, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)   # same data, model, lr: same run
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["train"]["data"] == [str(corpus / "text.txt")] and config["train"]["lr"] == 3e-3


def test_resume_refuses_a_flag_that_contradicts_the_run(corpus, tmp_path):
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--max_steps", "4"))
    result = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "run", "--max_steps", "8", "--lr", "5e-3",
                                               "--resume"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--lr 0.005" in result.stderr and "started with --lr 0.003" in result.stderr
    extended = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "run", "--max_steps", "8", "--resume"))
    assert extended.returncode == 0, extended.stderr[-2000:]      # more steps: allowed


def test_resume_refuses_a_tokenizer_that_changed_since(corpus, tmp_path):
    import shutil
    tok = tmp_path / "tok.json"
    args = tiny_args(corpus, tmp_path / "run", "--max_steps", "4") + ["--tokenizer", str(tok)]
    pretrain.main(args)
    other = tmp_path / "other"                 # retrain the tokenizer file, same size, other text
    other.mkdir()
    (other / "t.txt").write_text("".join(f"{i} zebra yak xylophone wombat\n" for i in range(400)), encoding="utf-8")
    pretrain.main(["--data", str(other / "t.txt"), "--tokenizer", str(other / "tok.json"), "--vocab_size", "300",
                   "--cache_dir", str(other / "cache"), "--out_dir", str(other / "run"), "--max_steps", "1",
                   "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "16", "--sample_tokens", "0"])
    shutil.copy(other / "tok.json", tok)
    before = (tmp_path / "run" / "model.pt").read_bytes()
    result = run_cli("pretrain.py", *args, "--max_steps", "8", "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tokenizer" in result.stderr and "tokenizer.json" in result.stderr
    assert (tmp_path / "run" / "model.pt").read_bytes() == before


def test_an_overwrite_cut_off_midway_leaves_no_stale_metrics(corpus, tmp_path, monkeypatch):
    pretrain.main(tiny_args(corpus, tmp_path / "run"))
    old_weights = (tmp_path / "run" / "model.pt").read_bytes()
    restore = crash_at_batch(monkeypatch, 3)          # before the first trained evaluation (step 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.main(tiny_args(corpus, tmp_path / "run", "--overwrite", "--lr", "5e-3"))
    restore()
    assert not (tmp_path / "run" / "metrics.json").exists()          # nothing looks finished
    assert (tmp_path / "run" / "model.pt").read_bytes() == old_weights   # the old weights, with their config
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 3e-3


def test_the_saved_weights_are_always_trained_ones(corpus, tmp_path, capsys):
    # a learning rate so high that training makes the held-out loss worse than at step 0
    pretrain.main(tiny_args(corpus, tmp_path / "run", "--max_steps", "4", "--lr", "5", "--min_lr", "5",
                            "--warmup_steps", "0", "--grad_clip", "0"))
    assert "training did not help on held-out data" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 4


@pytest.mark.parametrize("flag", ["--eval_interval", "--max_steps", "--n_head"])
def test_zero_values_are_refused_before_any_work(corpus, tmp_path, flag):
    result = run_cli("pretrain.py", *tiny_args(corpus, tmp_path / "x", flag, "0"))
    assert result.returncode == 2 and "at least 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", ["full_sft.py", "lora.py", "dpo.py", "grpo.py", "verifier.py", "distill.py"])
def test_a_negative_answer_length_is_refused_in_one_line(tmp_path, script):
    result = run_cli(script, "--max_new_tokens", "-1", "--out_dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "--max_new_tokens must be >= 0, got -1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", ["evaluation.py", "agent_eval.py"])
def test_an_answer_length_below_one_is_refused_before_the_model_loads(script):
    result = run_cli(script, "--max_new_tokens", "-1", "--ckpt", "no/such/folder")
    assert result.returncode == 2 and "--max_new_tokens must be at least 1, got -1" in result.stderr
    assert "Traceback" not in result.stderr


def test_too_little_text_for_validation_is_one_clear_line(tmp_path):
    (tmp_path / "one.txt").write_text("just one line of text\n", encoding="utf-8")
    result = run_cli("pretrain.py", *tiny_args(tmp_path, tmp_path / "x"), "--data", str(tmp_path / "one.txt"))
    assert result.returncode == 2 and "one.txt" in result.stderr and "split" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").rglob("*.tmp"))           # no half-written files left


def test_an_empty_file_does_not_leave_a_tokenizer_behind(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    result = run_cli("pretrain.py", "--data", str(tmp_path / "empty.txt"), "--tokenizer", str(tmp_path / "t.json"),
                     "--out_dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "empty.txt: file is empty" in result.stderr
    assert not (tmp_path / "t.json").exists()


def test_chat_stages_under_torchrun_guard_the_main_process_and_finish_together(tiny_pretrained, tmp_path):
    """SFT, LoRA and DPO as 2 gloo processes: each trains, only the main process evaluates, prints and
    writes its files (its summary line appears once), and both processes exit cleanly."""
    import random

    from conftest import WORDS
    from data.chat_data import plausible_wrong_answer, preference_pair, read_conversations, synthetic_names, write_jsonl
    rng = random.Random(0)
    pairs = [preference_pair(r, w) for r in read_conversations(tiny_pretrained / "train.jsonl")
             if (w := plausible_wrong_answer(r, rng, WORDS, synthetic_names()))]
    write_jsonl(tmp_path / "pairs.jsonl", pairs[:60])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = ["--data", str(tiny_pretrained / "train.jsonl"), "--eval_data", str(tiny_pretrained / "eval.jsonl"),
            "--max_steps", "2", "--eval_interval", "2", "--time_budget", "0", "--batch_size", "4",
            "--max_new_tokens", "2", "--device", "cpu"]
    runs = [("full_sft.py", ["--init_from", str(tiny_pretrained / "ckpt"), "--out_dir", str(tmp_path / "sft")],
             "sft: accuracy"),
            ("lora.py", ["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "lora"), "--replay", "0",
                         "--old_eval_data", str(tiny_pretrained / "eval.jsonl")], "lora: new skill"),
            ("dpo.py", ["--init_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "dpo"),
                        "--task_data", str(tiny_pretrained / "eval.jsonl"), "--data", str(tmp_path / "pairs.jsonl")],
             "dpo: held-out preference accuracy")]
    for script, flags, summary in runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / script), *flags, *(data if script != "dpo.py" else data[4:])]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
        assert result.stdout.count(summary) == 1, f"{script} printed its summary {result.stdout.count(summary)} times"
        assert json.loads((Path(flags[3]) / "metrics.json").read_text())


def test_a_language_the_run_does_not_train_on_never_picks_the_checkpoint(tmp_path):
    """--zh_share 0: the Chinese validation is reported, but the overall loss (which picks the best
    weights) is the English one alone; it used to keep an early checkpoint as the untrained language got worse."""
    import numpy as np
    from model import GPT, ModelConfig
    bins = {}
    for name, seed in (("val_en", 0), ("val_zh", 1)):
        np.random.default_rng(seed).integers(0, 64, 200).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
        bins[name] = TokenBin(tmp_path / f"{name}.bin", np.uint16)
    model = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=2, block_size=16, vocab_size=64,
                            ffn_hidden=32)).eval()
    token_bytes = torch.ones(64, dtype=torch.long)
    with torch.no_grad():
        both = pretrain.bits_per_byte_evaluator(bins, token_bytes, 16, 4, torch.device("cpu"))(model, None)
        english = pretrain.bits_per_byte_evaluator(bins, token_bytes, 16, 4, torch.device("cpu"),
                                                   untrained=("val_zh",))(model, None)
    assert english["val_loss"] == pytest.approx(english["val_loss_en"]) and english["val_loss_zh"] == both["val_loss_zh"]
    assert both["val_loss"] != pytest.approx(both["val_loss_en"])          # pooled: both languages count


@pytest.mark.parametrize("flags, message", [
    (["--chat_share", "1"], r"--chat_share 1.0: must be in \[0, 1\)"),
    (["--zh_share", "-0.1"], r"--zh_share -0.1: must be in \[0, 1\)"),
    (["--chat_share", "0.25", "--data", "my.txt"], "--chat_share mixes the generated chat tasks into the default corpus"),
])
def test_batch_shares_that_cannot_work_are_refused_before_any_data_is_read(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        pretrain.main([*flags, "--out_dir", str(tmp_path / "run")])
