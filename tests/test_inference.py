"""inference.py: one-shot continuation, REPL, and its clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "text.txt").write_text("hello world, 你好世界。\n" * 300, encoding="utf-8")
    pretrain.main(["--data", str(folder / "text.txt"), "--tokenizer", str(folder / "tok.json"),
                   "--vocab_size", "280", "--cache_dir", str(folder / "cache"), "--out_dir", str(folder / "run"),
                   "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "48",
                   "--batch_size", "4", "--max_steps", "30", "--eval_interval", "30", "--lr", "1e-2",
                   "--sample_tokens", "0"])
    return folder / "run"


def infer(*args, stdin=None):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_prompt_is_continued_and_streamed(ckpt):
    result = infer("--ckpt", str(ckpt), "--prompt", "hello", "--max_new_tokens", "20", "--seed", "1", "--stats")
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("hello") and len(first_line) > len("hello")
    assert "tokens/s" in result.stdout


def test_greedy_output_is_reproducible(ckpt):
    a = infer("--ckpt", str(ckpt), "--prompt", "你好", "--temperature", "0", "--max_new_tokens", "15")
    b = infer("--ckpt", str(ckpt), "--prompt", "你好", "--temperature", "0", "--max_new_tokens", "15",
              "--no-kv_cache")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert "\ufffd" not in a.stdout      # no half-decoded UTF-8 characters


def test_repl_reads_lines_until_exit(ckpt):
    result = infer("--ckpt", str(ckpt), "--max_new_tokens", "5", stdin="hello\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert ">>> hello" in result.stdout


def test_missing_checkpoint_names_the_command_that_makes_one(tmp_path):
    result = infer("--ckpt", str(tmp_path / "nothing"), "--prompt", "hi")
    assert result.returncode == 2
    assert "python pretrain.py" in result.stderr and "Traceback" not in result.stderr


def test_prompt_longer_than_the_context_is_refused(ckpt):
    result = infer("--ckpt", str(ckpt), "--prompt", "hello world " * 100)
    assert result.returncode == 2 and "context is 48" in result.stderr
    assert "hello world" not in result.stdout          # refused before anything is printed


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(ckpt, tmp_path):
    other = Tokenizer.from_texts(["completely different text " * 50], vocab_size=280)
    other.save(tmp_path / "other.json")
    result = infer("--ckpt", str(ckpt), "--tokenizer", str(tmp_path / "other.json"), "--prompt", "hi")
    assert result.returncode == 2 and "trained with tokenizer" in result.stderr


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top_p", "1.5")])
def test_invalid_sampling_values_are_refused(ckpt, flag, value):
    result = infer("--ckpt", str(ckpt), "--prompt", "hi", flag, value)
    assert result.returncode == 2 and flag in result.stderr


@pytest.fixture(scope="module")
def chat_ckpt(tiny_pretrained, tmp_path_factory):
    import full_sft
    out = tmp_path_factory.mktemp("chat") / "sft"
    full_sft.main(["--init_from", str(tiny_pretrained / "ckpt"), "--data", str(tiny_pretrained / "train.jsonl"),
                   "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--out_dir", str(out), "--max_steps", "2",
                   "--eval_interval", "2", "--time_budget", "0", "--batch_size", "4", "--max_new_tokens", "2"])
    return out


def test_a_chat_checkpoint_answers_in_chat_mode_without_echo(chat_ckpt):
    result = infer("--ckpt", str(chat_ckpt), "--prompt", "Who are you?", "--max_new_tokens", "5", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "Who are you?" not in result.stdout            # a chat answer, not a continuation of the prompt


def test_chat_repl_keeps_history_resets_and_drops_old_turns(chat_ckpt):
    long_turn = "apple bread crown dream eagle"                # ~20 tokens: a few turns fill the context
    lines = [long_turn] * 6 + ["/reset", "/system Be brief.", "hi", "/exit"]
    result = infer("--ckpt", str(chat_ckpt), "--max_new_tokens", "4", "--seed", "0", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "the oldest turn was dropped" in result.stdout   # the tiny model's context is 96 tokens
    assert "[conversation reset]" in result.stdout and "system prompt: 'Be brief.'" in result.stdout


def test_lora_flag_loads_an_adapter_on_its_base(chat_ckpt, tiny_pretrained, tmp_path):
    import lora
    out = tmp_path / "lora"
    lora.main(["--init_from", str(chat_ckpt), "--data", str(tiny_pretrained / "train.jsonl"),
               "--eval_data", str(tiny_pretrained / "eval.jsonl"), "--old_eval_data", str(tiny_pretrained / "eval.jsonl"),
               "--out_dir", str(out), "--max_steps", "2", "--eval_interval", "2", "--time_budget", "0",
               "--batch_size", "4", "--max_new_tokens", "2", "--rank", "2", "--replay", "0"])
    result = infer("--lora", str(out), "--prompt", "hi", "--max_new_tokens", "3", "--seed", "0")
    assert result.returncode == 0, result.stderr
    missing = infer("--lora", str(tmp_path / "nothing"), "--prompt", "hi")
    assert missing.returncode == 2 and "python lora.py" in missing.stderr
