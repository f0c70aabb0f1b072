"""ROUGE F-measures (rouge.py) on strings worked out by hand."""

import pytest

from dgx_spark_summary_from_human_feedback.rouge import lcs_length, rouge_l, rouge_n, rouge_scores, rouge_tokens

# ---- ROUGE


def test_identical_strings_score_one_and_disjoint_strings_zero():
    assert rouge_scores(["my dog ate my car"], ["my dog ate my car"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores(["my dog ate my car"], ["the cat sat on a mat"]) == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }
    assert rouge_scores([""], ["the cat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_reordered_words():
    # prediction: the cat sat on the mat          reference: on the mat the cat sat
    # rouge1: same multiset of 6 words             -> P = R = 6/6          -> 1.0
    # rouge2: prediction bigrams the-cat cat-sat sat-on on-the the-mat; reference on-the the-mat
    #         mat-the the-cat cat-sat; 4 shared of 5 each -> P = R = 4/5   -> 0.8
    # rougeL: longest common subsequence "the cat sat" (or "on the mat"), 3 of 6 -> 0.5
    assert rouge_n("the cat sat on the mat", "on the mat the cat sat", 1) == pytest.approx(1.0)
    assert rouge_n("the cat sat on the mat", "on the mat the cat sat", 2) == pytest.approx(0.8)
    assert rouge_l("the cat sat on the mat", "on the mat the cat sat") == pytest.approx(0.5)


def test_unequal_lengths_use_precision_and_recall():
    # prediction (7): the quick fox jumps over the dog
    # reference  (8): the fox quickly jumps over a lazy dog
    # rouge1: shared the (clipped to 1), fox, jumps, over, dog = 5 -> P 5/7, R 5/8
    #         F = 2PR/(P+R) = (50/56) / (75/56) = 2/3
    # rouge2: only jumps-over shared -> P 1/6, R 1/7, F = (2/42) / (13/42) = 2/13
    # rougeL: LCS the fox jumps over dog = 5 -> same P, R as rouge1 -> 2/3
    pred, ref = "the quick fox jumps over the dog", "the fox quickly jumps over a lazy dog"
    assert rouge_n(pred, ref, 1) == pytest.approx(2 / 3)
    assert rouge_n(pred, ref, 2) == pytest.approx(2 / 13)
    assert rouge_l(pred, ref) == pytest.approx(2 / 3)
    assert lcs_length(rouge_tokens(pred), rouge_tokens(ref)) == 5


def test_case_and_punctuation_are_ignored():
    assert rouge_tokens("My GF's car -- broke!! (again)") == ["my", "gf", "s", "car", "broke", "again"]
    scores = rouge_scores(["The CAT, sat... on the mat!"], ["the cat sat on the mat"])
    assert scores == {"rouge1": pytest.approx(1.0), "rouge2": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}


def test_scores_are_means_over_pairs():
    scores = rouge_scores(["the cat sat on the mat", "a b"], ["on the mat the cat sat", "c d"])
    assert scores == {"rouge1": pytest.approx(0.5), "rouge2": pytest.approx(0.4), "rougeL": pytest.approx(0.25)}
