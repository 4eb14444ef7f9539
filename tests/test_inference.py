"""inference.py and engine.py: batched generation, sampling, streaming text, the REPL, jsonl, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import (Engine, LoadConfig, SamplingParams, TextStream, apply_penalties, generate, left_pad, pack_batches,
                    sample_next_token)
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(hello_ckpt):
    return hello_ckpt


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
    assert "the oldest 1 turn(s) dropped" in result.stdout   # the tiny model's context is 96 tokens
    assert "[conversation reset]" in result.stdout and "system prompt: 'Be brief.'" in result.stdout


def test_a_message_too_long_for_the_context_keeps_the_history(chat_ckpt, tmp_path):
    lines = ["apple", "bread " * 200, f"/save {tmp_path / 'chat.json'}", "/exit"]
    result = infer("--ckpt", str(chat_ckpt), "--max_new_tokens", "3", "--seed", "0", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "error:" in result.stdout + result.stderr and "dropped" not in result.stdout
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["apple"]


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
    as_ckpt = infer("--ckpt", str(out), "--prompt", "hi")          # an adapter given where a checkpoint goes
    assert as_ckpt.returncode == 2 and f"is a LoRA adapter, not a full checkpoint: use --lora {out}" in as_ckpt.stderr


# ---- model.py: left-padded batches, the KV cache's size, sampling ------------------------------------------------


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
    config.update(overrides)
    return GPT(ModelConfig(**config)).eval()


@pytest.mark.parametrize("flavour", [dict(flavour="gpt2"), dict(flavour="llama", n_kv_head=2)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_gives_every_row_its_own_greedy_answer(flavour, use_cache):
    model = tiny(**flavour)
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 6, 1)]
    idx, pad_lengths = left_pad(prompts, pad_id=0)
    assert idx.shape == (4, 11) and pad_lengths.tolist() == [8, 0, 5, 10]
    batched = generate(model, idx, 12, temperature=0, pad_lengths=pad_lengths, use_cache=use_cache)[:, 11:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):]
        assert torch.equal(batched[row], alone), f"row {row} differs from its prompt generated alone"


def test_padding_never_changes_the_logits_of_real_tokens():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 7))
    alone, _ = model(prompt)
    for pad_id in (0, 5):
        padded = torch.cat([torch.full((1, 4), pad_id), prompt], dim=1)
        logits, _ = model(padded, pad_lengths=torch.tensor([4]))
        assert torch.allclose(logits[:, 4:], alone, atol=1e-5)


def test_an_unpadded_batch_generates_exactly_as_without_padding_info():
    model = tiny(flavour="gpt2")
    idx = torch.randint(0, 97, (3, 5))
    plain = model.generate(idx, 10, temperature=0)
    assert torch.equal(generate(model, idx, 10, temperature=0, pad_lengths=torch.zeros(3, dtype=torch.long)), plain)


def test_the_kv_cache_holds_prompt_plus_answer_not_the_whole_context(monkeypatch):
    model = tiny(block_size=4096)
    sizes = []
    real = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda batch, max_len=None: sizes.append(max_len) or real(batch, max_len))
    model.generate(torch.zeros(2, 9, dtype=torch.long), 7, temperature=0)
    assert sizes == [9 + 7]


def test_min_p_drops_tokens_far_less_likely_than_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, 1.0, generator=g, min_p=0.2).item() for _ in range(300)}
    assert picks == {0, 1, 2}           # 0.05 < 0.2 * 0.5 is dropped; 0.15 >= 0.1 stays


def test_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    out = apply_penalties(logits, seen, counts, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]                 # positive / 2, negative * 2, unseen kept
    out = apply_penalties(logits, seen, counts, frequency_penalty=0.1, presence_penalty=0.5)
    assert torch.allclose(out, torch.tensor([[2.0, -1.0, 0.5, 1.0 - 0.3 - 0.5]]))


def test_a_repetition_penalty_steers_greedy_decoding_away_from_repeats():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 4))
    plain = model.generate(prompt, 30, temperature=0)[0].tolist()
    penalized = generate(model, prompt, 30, temperature=0, repetition_penalty=1e6)[0].tolist()
    assert len(set(plain)) < len(plain)                # an untrained model loops...
    assert len(set(penalized)) == len(penalized)       # ...a huge penalty forbids every token seen before


# ---- engine.py: text streams, batches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer():
    return Tokenizer([])                                  # no merges: token i is byte i


def push_all(stream: TextStream, text: str) -> list[str]:
    return [stream.push(b) for b in text.encode("utf-8")]


def test_a_character_split_over_tokens_is_held_back_until_complete(byte_tokenizer):
    pieces = push_all(TextStream(byte_tokenizer), "你好")      # 3 bytes each
    assert pieces == ["", "", "你", "", "", "好"]


def test_a_stop_string_ends_the_text_and_its_beginning_is_held_back(byte_tokenizer):
    stream = TextStream(byte_tokenizer, stop=["\n\nQ:"])
    pieces = push_all(stream, "A.\n\nQ: more")
    assert "".join(pieces) == "A." and stream.text == "A." and stream.stopped
    stream = TextStream(byte_tokenizer, stop=["\n\nQ:"])
    assert "".join(push_all(stream, "A.\n\nB")) + stream.finish() == "A.\n\nB"   # a false alarm is released


def test_batches_are_sorted_by_length_and_never_cost_a_row_its_room():
    lengths, budgets = [30, 5, 12, 6, 40], [10, 10, 10, 10, 8]      # a budget never exceeds its own room
    batches = pack_batches(lengths, budgets, context=48, batch_size=2)
    assert batches == [[1, 3], [2, 0], [4]]
    for batch in batches:
        assert max(lengths[i] for i in batch) + max(budgets[i] for i in batch) <= 48
    assert pack_batches([30, 5], [18, 40], context=48, batch_size=8) == [[1], [0]]   # 30 + 40 would not fit


def test_engine_batches_answer_like_single_prompts(ckpt):
    engine = Engine.load(LoadConfig(ckpt=str(ckpt)))
    prompts = [engine.text_ids(t) for t in ("hello", "你好世界", "world, 你", "h")]
    params = SamplingParams.greedy(max_new_tokens=9)
    batched = engine.complete(prompts, params, batch_size=4)
    for prompt, done in zip(prompts, batched):
        alone = "".join(d.text for d in engine.stream([prompt], params))
        assert done.text == alone and done.completion_tokens == 9 and done.finish_reason == "length"


def test_evaluation_greedy_answers_match_single_prompt_generation(tiny_pretrained):
    from scoring import greedy_answers
    from tokenizer.chat import render_chat
    engine = Engine.load(LoadConfig(ckpt=str(tiny_pretrained / "ckpt")))
    conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": "?"}]
                     for text in ("apple", "repeat: bread crown dream", "x", "upper: eagle flame")]
    answers = greedy_answers(engine.model, engine.tokenizer, conversations, max_new_tokens=6, batch_size=3)
    for conversation, answer in zip(conversations, answers):
        ids = render_chat(conversation[:-1], engine.tokenizer, add_generation_prompt=True)[0]
        out = generate(engine.model, torch.tensor([ids]), 6, temperature=0, stop_tokens=(engine.tokenizer.im_end_id,))
        new = out[0, len(ids):].tolist()
        new = new[:new.index(engine.tokenizer.im_end_id)] if engine.tokenizer.im_end_id in new else new
        assert answer == engine.tokenizer.decode(new)


# ---- inference.py: modes and commands ----------------------------------------------------------------------------


def test_jsonl_mode_answers_every_line_in_order(ckpt):
    lines = ["hello", json.dumps({"prompt": "你好", "id": 7}), "", json.dumps({"messages": [{"role": "user", "content": "world"}]})]
    result = infer("--ckpt", str(ckpt), "--jsonl", "--temperature", "0", "--max_new_tokens", "6", "--batch_size", "2",
                   stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("prompt") for r in records] == ["hello", "你好", None]
    assert records[1]["id"] == 7 and records[2]["messages"][0]["content"] == "world"
    assert all(r["completion_tokens"] == 6 and r["answer"] for r in records)
    one_shot = infer("--ckpt", str(ckpt), "--prompt", "hello", "--temperature", "0", "--max_new_tokens", "6")
    assert one_shot.stdout == "hello" + records[0]["answer"] + "\n"


def test_non_utf8_stdin_is_refused_with_its_line_number(ckpt):
    result = subprocess.run([sys.executable, "inference.py", "--ckpt", str(ckpt), "--jsonl"], cwd=ROOT,
                            input=b"hello\n\xff\xfeoops\n", capture_output=True, timeout=120)
    assert result.returncode == 2 and result.stdout == b""
    assert b"stdin line 2 is not valid UTF-8" in result.stderr
    repl = subprocess.run([sys.executable, "inference.py", "--ckpt", str(ckpt), "--max_new_tokens", "3"], cwd=ROOT,
                          input=b"\xff\xfe\nhello\n/exit\n", capture_output=True, timeout=120)
    assert repl.returncode == 0 and b"not valid UTF-8" in repl.stdout and b">>> hello" in repl.stdout


def test_repl_commands_set_save_load_and_refuse_unknown_ones(chat_ckpt, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["/set temperature 0", "/set top_p 2", "/set", "/system Be brief.", "hello", f"/save {saved}", "/reset",
             f"/load {saved}", "/frobnicate", "/help", "/exit"]
    result = infer("--ckpt", str(chat_ckpt), "--max_new_tokens", "3", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[temperature = 0.0]" in out and "top_p must be in (0, 1]" in out and "temperature=0.0" in out
    assert "unknown command /frobnicate" in out and "/set NAME VALUE" in out
    record = json.loads(saved.read_text(encoding="utf-8"))
    assert record["system"] == "Be brief." and record["messages"][0] == {"role": "user", "content": "hello"}
    assert record["settings"]["temperature"] == 0.0 and "[loaded 1 turns" in out


def test_ctrl_c_stops_the_answer_and_the_repl_goes_on(ckpt, monkeypatch, capsys):
    import inference
    engine = Engine.load(LoadConfig(ckpt=str(ckpt)))
    whole = engine.stream

    def interrupted_after_two_pieces(*args, **kwargs):
        for i, delta in enumerate(whole(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt           # what Ctrl-C does in the middle of an answer
            yield delta
    monkeypatch.setattr(engine, "stream", interrupted_after_two_pieces)
    typed = iter(["hello", "world", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    inference.repl(inference.Session(engine, SamplingParams.greedy(20)))
    out = capsys.readouterr().out
    assert out.count("[stopped]") == 2            # both answers were stopped, and the REPL read every line


def test_init_from_is_an_alias_of_ckpt(ckpt):
    result = infer("--init_from", str(ckpt), "--prompt", "hello", "--max_new_tokens", "3")
    assert result.returncode == 0 and result.stdout.startswith("hello")
