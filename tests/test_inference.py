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
