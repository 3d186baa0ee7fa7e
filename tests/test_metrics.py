"""training.metrics: tokenisation (Chinese per character), BLEU-4, ROUGE-L, IoU, percentiles."""

from __future__ import annotations

import math

import pytest

from training.metrics import corpus_bleu, iou, lcs_length, percentile, rouge_l, sentence_bleu, tokenize


def test_tokenize_mixed_chinese_english_and_punctuation():
    assert tokenize('MOVE_OBJECT(object="红色方块")') == ["MOVE_OBJECT", "(", "object", "=", '"', "红", "色", "方", "块",
                                                          '"', ")"]
    assert tokenize("把 red cube 放到碗里。") == ["把", "red", "cube", "放", "到", "碗", "里", "。"]
    assert tokenize("  ") == [] and tokenize("") == []
    assert tokenize("x1, 40") == ["x1", ",", "40"]


def test_bleu_identical_and_disjoint():
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert sentence_bleu("", "a b c") == 0.0
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    assert sentence_bleu("x y z w", "a b c d", smooth=False) == 0.0


def test_sentence_bleu_known_value_with_smoothing():
    # 7 x "the" vs "the cat is on the mat": p1 = 2/7 (clipped), p2..p4 have no match ->
    # Chen & Cherry method 3: 1/(2*6), 1/(4*5), 1/(8*4); hypothesis longer than reference: BP = 1
    expected = math.exp((math.log(2 / 7) + math.log(1 / 12) + math.log(1 / 20) + math.log(1 / 32)) / 4)
    assert sentence_bleu("the the the the the the the", "the cat is on the mat") == pytest.approx(expected)
    assert expected == pytest.approx(0.0781, abs=1e-4)


def test_short_exact_answer_scores_one():
    # STOP() is 3 tokens: no 4-grams exist, so that order is left out (effective order), not smoothed
    assert sentence_bleu("STOP()", "STOP()") == pytest.approx(1.0)
    assert sentence_bleu("STOP()", 'CLARIFY(reason="x")') < 0.2


def test_bleu_brevity_penalty():
    # hypothesis = first 4 of 6 reference words: all n-gram precisions 1, BP = exp(1 - 6/4)
    bleu = sentence_bleu("the cat sat on", "the cat sat on the mat")
    assert bleu == pytest.approx(math.exp(1 - 6 / 4))
    # corpus BLEU sums counts: the same pair twice gives the same score
    assert corpus_bleu(["the cat sat on"] * 2, ["the cat sat on the mat"] * 2) == pytest.approx(bleu)


def test_bleu_multiple_references_and_chinese():
    assert sentence_bleu("红色方块", ["蓝色方块", "红色方块"]) == pytest.approx(1.0)
    # 红色方块 vs 红色方盒: per character p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> 1/(2*1)
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert sentence_bleu("红色方块", "红色方盒") == pytest.approx(expected)


def test_rouge_l_known_pairs():
    # LCS "the cat on the mat" = 5: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("红色方块", "红色方盒") == pytest.approx(0.75)  # per character: LCS 3 of 4
    assert rouge_l("把红色方块放到蓝色碗里", "把红色方块放进蓝色的碗里") == pytest.approx(
        2 * (10 / 11) * (10 / 12) / (10 / 11 + 10 / 12))  # LCS 10: only 到/进 and 的 differ
    assert rouge_l("a b", "c d") == 0.0
    assert rouge_l("STOP()", "STOP()") == pytest.approx(1.0)
    assert lcs_length("ABCBDAB", "BDCABA") == 4


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([10, 10, 0, 0], [0, 0, 10, 10]) == pytest.approx(1.0)  # corners in any order
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0  # identical, if empty: a point predicted exactly
    assert iou([0, 0, 0, 0], [1, 1, 1, 1]) == 0.0  # no area, not the same: no overlap

    class B:
        x_min, y_min, x_max, y_max = 0, 0, 4, 4

    assert iou(B(), [0, 0, 4, 2]) == pytest.approx(0.5)


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
