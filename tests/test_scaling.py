"""Inference-time scaling: pass@k against counting every subset, self-consistency's vote, and
evaluation.py --samples end to end."""
import itertools
import json
from math import comb

import pytest

import evaluation
from scoring import majority_answer, pass_at_k, pick_best, scaling_report


@pytest.mark.parametrize("n,correct", [(4, 0), (4, 1), (5, 2), (8, 3), (6, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_answer(n, correct):
    right = [True] * correct + [False] * (n - correct)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        counted = sum(any(right[i] for i in s) for s in subsets) / comb(n, k)
        assert pass_at_k(n, correct, k) == pytest.approx(counted)


def test_the_vote_takes_the_most_common_final_answer_and_a_tie_goes_to_the_first():
    assert majority_answer(["12", "13", "steps\nAnswer: 13", "12", "x\nAnswer: 13"]) == "13"
    assert majority_answer(["b", "a", "a", "b"]) == "b"


def test_a_verifier_weighs_the_votes_it_breaks_ties_and_outvotes_a_majority_it_is_sure_is_wrong():
    answers = ["Answer: 42", "x\nAnswer: 41", "y\nAnswer: 42", "Answer: 41"]
    assert pick_best(answers) == (0, "vote 2 x '42', 2 x '41'")                  # a tie: the first reached
    # sigmoid weights: 42 gets 0.27 + 0.50 = 0.77, 41 gets 0.73 + 0.62 = 1.35; of the 41s the higher score is kept
    kept, why = pick_best(answers, [-1.0, 1.0, 0.0, 0.5])
    assert kept == 1 and why == "verifier-weighted vote 1.35 x '41', 0.77 x '42'"
    # three 42s the verifier is unsure of (0.62 each) outvote one 41 it likes (0.95)
    assert pick_best(["Answer: 42"] * 3 + ["Answer: 41"], [0.5, 0.5, 0.5, 3.0])[0] == 0
    # three 42s it is sure are wrong (0.05 each) do not
    assert pick_best(["Answer: 42"] * 3 + ["Answer: 41"], [-3.0, -3.0, -3.0, 3.0])[0] == 3
    # any score is a weight, however far out (a plain exp(-score) overflows at -710)
    assert pick_best(["a", "b"], [-800.0, 2.0])[0] == 1 and pick_best(["a", "b"], [800.0, 2.0])[0] == 0


def test_scaling_report_counts_per_item_and_family():
    records = [{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
                "family": "f"},
               {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "B"}],
                "family": "g"}]
    samples = [["A", "A", "A", "x"], ["x", "y", "x", "B"]]
    report = scaling_report(records, samples, [1, 2, 4])
    assert report["pass_at_k"][1] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert report["pass_at_k"][4] == 1.0
    assert report["maj_at_k"][4] == pytest.approx(0.5)       # item 1: "A" wins; item 2: "x" wins, though B is there
    assert report["maj_at_k_by_family"][4] == {"f": 1.0, "g": 0.0}


def test_evaluation_samples_reports_and_plots_pass_and_maj_at_k(tiny_pretrained, tmp_path, capsys):
    out, plot = tmp_path / "report.json", tmp_path / "scaling.png"
    evaluation.main(["--ckpt", str(tiny_pretrained / "ckpt"), "--tasks", "chat", "--data",
                     str(tiny_pretrained / "eval.jsonl"), "--samples", "4", "--max_new_tokens", "3",
                     "--out", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())["scaling"]
    assert report["ks"] == [1, 2, 4] and report["samples"] == 4 and report["n"] > 0
    p = [report["pass_at_k"][str(k)] for k in (1, 2, 4)]
    assert p == sorted(p) and all(0 <= v <= 1 for v in p)      # more samples never lower pass@k
    assert plot.stat().st_size > 0 and "pass@k" in capsys.readouterr().out
    with pytest.raises(ValueError, match="temperature above 0"):
        evaluation.main(["--ckpt", str(tiny_pretrained / "ckpt"), "--samples", "4", "--temperature", "0"])
