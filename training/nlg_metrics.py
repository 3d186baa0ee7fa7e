"""BLEU-4 and ROUGE-1/2/L of generated text, as LLaMA-Factory's `do_predict` reports them.

``predict_results.json`` keys and scale are LLaMA-Factory's: ``predict_bleu-4``, ``predict_rouge-1``,
``predict_rouge-2``, ``predict_rouge-l`` (per-sample scores in percent, averaged, 4 decimals), plus
``predict_runtime``, ``predict_samples_per_second`` and ``predict_steps_per_second``.

- BLEU-4 is LLaMA-Factory's definition: NLTK's sentence BLEU over the CHARACTERS of the prediction
  and the label, uniform weights, smoothing method 3 (a k-th order without any match counts
  1 / (2^k x its n-gram count)); no unigram match at all scores 0.
- ROUGE-1/2/L are F1 scores over words (training.metrics.tokenize): a run of letters/digits is a
  word, every Chinese character is one (LLaMA-Factory segments Chinese into words with jieba, so
  Chinese ROUGE is close to, not equal to, its figures; English is the same up to punctuation
  handling), n-gram counts clipped, ROUGE-L from the longest common subsequence. An empty prediction
  or label scores 0.
"""

from __future__ import annotations

import math
from typing import Iterable

from training.metrics import _brevity_penalty, _ngrams, rouge_l, tokenize

__all__ = ["bleu4", "rouge_n", "rouge_l_f1", "sample_scores", "predict_results", "METRIC_KEYS"]

METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def bleu4(prediction: str, label: str) -> float:
    """Character BLEU-4 in [0, 1] (NLTK sentence_bleu with SmoothingFunction().method3)."""
    hyp, ref = list(prediction), list(label)
    if not hyp:
        return 0.0
    log_sum = 0.0
    doubling = 1
    for n in range(1, 5):
        h = _ngrams(hyp, n)
        r = _ngrams(ref, n)
        matches = sum(min(c, r[g]) for g, c in h.items())
        total = max(1, sum(h.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            doubling *= 2
            precision = 1.0 / (doubling * total)
        else:
            precision = matches / total
        log_sum += 0.25 * math.log(precision)
    return _brevity_penalty(len(hyp), len(ref)) * math.exp(log_sum)


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0 or predicted == 0 or reference == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, label: str, n: int) -> float:
    """ROUGE-n F1 in [0, 1] over words (Chinese per character)."""
    p, r = _ngrams(tokenize(prediction), n), _ngrams(tokenize(label), n)
    return _f1(sum(min(c, r[g]) for g, c in p.items()), sum(p.values()), sum(r.values()))


def rouge_l_f1(prediction: str, label: str) -> float:
    """ROUGE-L F1 in [0, 1] over words (Chinese per character)."""
    return rouge_l(tokenize(prediction), tokenize(label))


def sample_scores(prediction: str, label: str) -> dict[str, float]:
    """One sample's scores in percent, 4 decimals (LLaMA-Factory's ComputeSimilarity scale)."""
    return {
        "bleu-4": round(100 * bleu4(prediction, label), 4),
        "rouge-1": round(100 * rouge_n(prediction, label, 1), 4),
        "rouge-2": round(100 * rouge_n(prediction, label, 2), 4),
        "rouge-l": round(100 * rouge_l_f1(prediction, label), 4),
    }


def predict_results(scores: Iterable[dict[str, float]], runtime_s: float, samples: int, steps: int) -> dict:
    """``predict_results.json`` as LLaMA-Factory writes it."""
    scores = list(scores)
    out: dict[str, float] = {}
    for key in METRIC_KEYS:
        out[f"predict_{key}"] = round(sum(s[key] for s in scores) / len(scores), 4) if scores else 0.0
    runtime = max(runtime_s, 1e-9)
    out["predict_runtime"] = round(runtime_s, 4)
    out["predict_samples_per_second"] = round(samples / runtime, 3)
    out["predict_steps_per_second"] = round(steps / runtime, 3)
    return out
