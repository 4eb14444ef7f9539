"""Tests import the project's modules from the repository root; shared fixtures for the chat stages."""
import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):      # pytest -n 2: two worker processes share the cores, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")          # (set before torch is imported; subprocesses inherit it)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---- shared by test_sft.py and test_lora.py: a tiny pretrained checkpoint and chat data ----
import pytest  # noqa: E402

WORDS = sorted({w for w in ("apple bread crown dream eagle flame grape honey island jewel knight lemon "
                            "mirror night ocean pearl queen river stone tiger umbra violet water youth zebra "
                            "amber blaze cloud dusk ember frost glow haze ivory jade").split()})


def pretrain_tiny(folder: Path, out: str = "ckpt", steps: int = 4, eval_interval: int = 4, extra=()) -> Path:
    """pretrain.py on a tiny text with a tiny model (1 layer x 32, context 96, vocab 320) -> folder/out.

    extra: more flags, e.g. ("--n_experts", "4") or ("--n_encoder_layer", "1")."""
    text = folder / "text.txt"
    if not text.exists():
        text.write_text("\n".join(f"{w} {w.upper()} {w[::-1]}" for w in WORDS * 20), encoding="utf-8")
    import pretrain
    pretrain.main(["--data", str(text), "--tokenizer", str(folder / "tok.json"), "--vocab_size", "320",
                   "--cache_dir", str(folder / "cache"), "--out_dir", str(folder / out), "--n_layer", "1",
                   "--n_embd", "32", "--n_head", "2", "--block_size", "96", "--batch_size", "4",
                   "--max_steps", str(steps), "--eval_interval", str(eval_interval), "--sample_tokens", "0",
                   "--time_budget", "0", *extra])
    return folder / out


def write_chat_data(folder: Path, n_train: int = 200, n_eval_per_family: int = 2) -> list[str]:
    """train.jsonl and eval.jsonl of generated chat tasks in folder; returns the --data/--eval_data flags."""
    from data.chat_data import generate_chat_data, write_jsonl
    train, held_out = generate_chat_data(WORDS, n_train, n_eval_per_family, seed=0)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", held_out)
    return ["--data", str(folder / "train.jsonl"), "--eval_data", str(folder / "eval.jsonl")]


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pre")
    pretrain_tiny(folder)
    write_chat_data(folder)
    return folder


# ---- shared by test_inference.py, test_serve.py and test_web.py: a tiny model that has learned one line ----
@pytest.fixture(scope="session")
def hello_ckpt(tmp_path_factory):
    """A 1-layer model trained on "hello world, 你好世界。" until it repeats it (English and Chinese):
    its answers are never empty, and it never learned to produce a stop token."""
    folder = tmp_path_factory.mktemp("hello")
    (folder / "text.txt").write_text("hello world, 你好世界。\n" * 300, encoding="utf-8")
    import pretrain
    pretrain.main(["--data", str(folder / "text.txt"), "--tokenizer", str(folder / "tok.json"),
                   "--vocab_size", "280", "--cache_dir", str(folder / "cache"), "--out_dir", str(folder / "run"),
                   "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "48",
                   "--batch_size", "4", "--max_steps", "30", "--eval_interval", "30", "--lr", "1e-2",
                   "--sample_tokens", "0", "--time_budget", "0"])
    return folder / "run"
