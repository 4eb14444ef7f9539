"""Corpus-grounded tasks (data/corpus_tasks.py) and multiple-choice scoring by log-likelihood (evaluation.py)."""
import json
import random

import pytest
import torch

from data.chat_data import generate_chat_data, plausible_wrong_answer
from data.corpus_tasks import play_choice_items, poem_choice_items, speaker_records, speeches
from data.pretrain_data import DataError
from evaluation import multiple_choice_report, option_logprobs, read_choice_items
from model import GPT, ModelConfig
from tokenizer import Tokenizer

PLAY = """ACT I. Scene 1.

BERTRAM.
And I will do so, my good lord.

PAROLLES.
Worthy fellows; and like to prove most sinewy sword-men.

FIRST LORD.
We shall, noble captain, we shall indeed.

[Exeunt.]

LAFEU.
Pardon, my lord, for me and for my tidings.

KING.
I'll fee thee to stand up, good Lafeu, I will.
"""
OTHER_PLAY = PLAY.replace("BERTRAM", "ROMEO").replace("PAROLLES", "MERCUTIO").replace("LAFEU", "TYBALT")
POEMS = "\n\n".join(f"《诗{i}》\n作者：某{i}\n" + "\n".join(f"第{i}首诗的第{k}句话。" for k in range(6)) for i in range(8))


def test_speeches_are_runs_of_consecutive_speakers_broken_by_stage_directions():
    assert speeches(PLAY) == [[("BERTRAM", "And I will do so, my good lord."),
                               ("PAROLLES", "Worthy fellows; and like to prove most sinewy sword-men."),
                               ("FIRST LORD", "We shall, noble captain, we shall indeed.")],
                              [("LAFEU", "Pardon, my lord, for me and for my tidings."),
                               ("KING", "I'll fee thee to stand up, good Lafeu, I will.")]]


def test_speaker_answers_name_who_says_the_quoted_line_in_the_passage():
    for record in speaker_records(PLAY * 3, 30, random.Random(0)):
        prompt, answer = (m["content"] for m in record["conversations"])
        line = prompt.split('"')[1] if '"' in prompt else prompt.split("“")[1].split("”")[0]
        passage = prompt.split("\n")
        # the speaker's name stands right above the quoted line in the passage
        assert passage[passage.index(line) - 1] == answer + "."


def test_held_out_speaker_passages_come_only_from_the_eval_text():
    train, held_out = generate_chat_data(["apple", "bread", "crown", "dream", "eagle", "flame"], 40, 5,
                                         families=("speaker",), plays={"train": PLAY, "eval": OTHER_PLAY})
    assert {r["conversations"][1]["content"] for r in held_out} <= {"ROMEO", "MERCUTIO", "FIRST LORD", "TYBALT", "KING"}
    assert not any("ROMEO" in json.dumps(r) or "MERCUTIO" in json.dumps(r) for r in train)
    with pytest.raises(ValueError, match="needs play text"):
        generate_chat_data(["apple"], 10, 1, families=("speaker",))


def test_a_plausible_wrong_speaker_is_another_speaker_of_the_passage():
    record = speaker_records(PLAY, 1, random.Random(3))[0]
    wrong = plausible_wrong_answer(record, random.Random(0), [], [])
    assert wrong != record["conversations"][1]["content"] and wrong + ".\n" in record["conversations"][0]["content"]


def test_choice_items_have_distinct_options_and_point_at_the_true_continuation():
    text = "\n".join(f"{PLAY}\nHELENA.\nThis is the {i}th line that a learner should see here.\n" for i in range(40))
    items = play_choice_items(text, 10, random.Random(0)) + poem_choice_items(POEMS, 10, random.Random(0))
    assert {i["family"] for i in items} == {"next_line", "next_speaker", "next_verse"}
    for item in items:
        assert len(set(item["options"])) == len(item["options"]) == 4
        right = item["options"][item["answer"]]
        if item["family"] == "next_verse":
            assert all(len(o) == len(right) for o in item["options"])   # no length give-away
            assert (item["context"] + right) in POEMS
        else:
            assert (item["context"] + right) in text


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    torch.manual_seed(0)
    tok = Tokenizer.from_texts([PLAY + POEMS], vocab_size=300, progress=False)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    return model.eval(), tok


def test_option_logprob_is_the_sum_of_the_options_token_logprobs(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    item = {"context": "BERTRAM.\nAnd I", "options": [" will", " shall go"], "answer": 0}
    scores = option_logprobs(model, tok, [item])[0]
    for option, score in zip(item["options"], scores):
        ids = tok.encode_ordinary(item["context"]) + tok.encode_ordinary(option)
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)      # (T, V)
        n = len(tok.encode_ordinary(option))
        expected = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_long_contexts_lose_their_oldest_tokens_not_the_option(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    long_item = {"context": PLAY * 4, "options": ["KING.", "LAFEU."], "answer": 0}
    short_item = {"context": tok.decode(tok.encode_ordinary(PLAY * 4)[-40:]), "options": ["KING.", "LAFEU."], "answer": 0}
    assert option_logprobs(model, tok, [long_item])[0] == pytest.approx(option_logprobs(model, tok, [short_item])[0], abs=1e-4)


def test_the_report_counts_the_most_likely_option_as_the_choice(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    items = [{"context": "PAROLLES.\n", "options": ["Worthy", "fellows", "captain"], "answer": a, "family": "f"}
             for a in range(3)] + [{"messages": [{"role": "user", "content": "Who?"}], "options": ["KING", "LAFEU"],
                                    "answer": 1, "family": "chat"}]
    scores = option_logprobs(model, tok, items)
    report = multiple_choice_report(model, tok, items)
    picked = [s.index(max(s)) for s in scores]
    assert report["accuracy_by_family"]["f"] == pytest.approx(1 / 3)        # exactly one of the three is right
    assert report["accuracy_by_family"]["chat"] == float(picked[3] == 1)
    assert report["chance_by_family"] == {"chat": 0.5, "f": pytest.approx(1 / 3)}


@pytest.mark.parametrize("line,message", [
    ('{"options": ["a", "b"], "answer": 0}', 'needs "context"'),
    ('{"context": "x", "options": ["a"], "answer": 0}', "at least two"),
    ('{"context": "x", "options": ["a", "b"], "answer": 2}', '"answer" must be the index'),
    ('{"context": "x", "options": ["a", "b"]', "not valid JSON"),
])
def test_bad_choice_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "x", "options": ["a", "b"], "answer": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"mc\.jsonl:2: .*{message}"):
        read_choice_items(path)
