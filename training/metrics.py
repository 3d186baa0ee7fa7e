"""Text and box metrics for vla-eval: BLEU-4, ROUGE-L, IoU. Pure Python.

Tokenisation (:func:`tokenize`) handles mixed Chinese/English text the way the evaluation of
Chinese instruction-tuning usually does, without a word segmenter: every CJK character is one
token, every run of ASCII letters/digits/underscore is one word, and every other visible
character (punctuation such as ``(`` ``"`` ``=`` ``,``) is a token of its own. Whitespace only
separates. Case is kept (``MOVE_OBJECT`` vs ``move_object`` differ for a robot).

- :func:`sentence_bleu` — BLEU-4 of one hypothesis against one or more references, uniform
  weights, brevity penalty, and Chen & Cherry (2014) smoothing method 3 (the "NIST geometric"
  smoothing that LLaMA-Factory's evaluation uses through NLTK) for orders without a match, and
  sacrebleu's "effective order" for orders the hypothesis is too short to have, so a short exact
  answer such as ``STOP()`` (3 tokens) scores 1.0.
- :func:`corpus_bleu` — Papineni et al. (2002) corpus BLEU-4 (counts summed over the corpus,
  no smoothing).
- :func:`rouge_l` — ROUGE-L F-measure (beta = 1) from the longest common subsequence.
- :func:`iou` — intersection over union of two ``[x1, y1, x2, y2]`` boxes (or objects with
  ``x_min``/``y_min``/``x_max``/``y_max``): vla_node.actions.box_iou, the one the replay
  reports use too.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

from vla_node.actions import box_iou as iou

__all__ = ["tokenize", "sentence_bleu", "corpus_bleu", "rouge_l", "lcs_length", "iou", "percentile"]

# CJK Unified Ideographs (+ extension A, compatibility ideographs), Hiragana/Katakana, Hangul,
# and CJK punctuation / full-width forms: one token per character.
_CJK = (
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff00-\uffef"  # half/full-width forms
)
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\s\w]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens: CJK per character, other words per word, punctuation per char.

    >>> tokenize('MOVE_OBJECT(object="红色方块")')
    ['MOVE_OBJECT', '(', 'object', '=', '"', '红', '色', '方', '块', '"', ')']
    """
    return _TOKEN_RE.findall(text or "")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_tokens(x: str | Sequence[str]) -> list[str]:
    return tokenize(x) if isinstance(x, str) else list(x)


def _refs_for(hypothesis, references) -> list[list[str]]:
    """References as token lists. With a string hypothesis, ``references`` is a string or a list
    of strings; with a tokenised hypothesis, a token list or a list of token lists."""
    if isinstance(references, str):
        refs = [tokenize(references)]
    elif not isinstance(hypothesis, str) and references and all(isinstance(t, str) for t in references):
        refs = [list(references)]  # one tokenised reference
    else:
        refs = [_as_tokens(r) for r in references]
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def _closest_ref_len(hyp_len: int, refs: list[list[str]]) -> int:
    return min((abs(len(r) - hyp_len), len(r)) for r in refs)[1]


def _clipped_counts(hyp: list[str], refs: list[list[str]], max_n: int) -> tuple[list[int], list[int]]:
    """Per order n: (clipped n-gram matches, hypothesis n-gram count)."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        h = _ngrams(hyp, n)
        max_ref: Counter = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        matches.append(sum(min(c, max_ref[g]) for g, c in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    return matches, totals


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len == 0:
        return 0.0
    if hyp_len >= ref_len:
        return 1.0
    return math.exp(1.0 - ref_len / hyp_len)


def sentence_bleu(hypothesis: str | Sequence[str], references, max_n: int = 4, smooth: bool = True) -> float:
    """BLEU-``max_n`` (default 4) of one hypothesis in [0, 1].

    ``references``: a string, a token list, or a list of either. Strings are tokenised with
    :func:`tokenize`. ``smooth=True`` applies Chen & Cherry smoothing method 3: the k-th order
    whose match count is zero gets precision ``1 / (2**k * total)`` instead of 0. Orders longer
    than the hypothesis are left out of the geometric mean (effective order).
    """
    hyp = _as_tokens(hypothesis)
    refs = _refs_for(hypothesis, references)
    if not hyp:
        return 0.0
    matches, totals = _clipped_counts(hyp, refs, max_n)
    log_p = 0.0
    k = 1
    orders = 0
    for m, t in zip(matches, totals):
        if t == 0:
            continue  # hypothesis shorter than n: this order does not exist ("effective order")
        orders += 1
        if m == 0:
            if not smooth:
                return 0.0
            p = 1.0 / (2**k * t)
            k += 1
        else:
            p = m / t
        log_p += math.log(p)
    log_p /= max(orders, 1)
    bp = _brevity_penalty(len(hyp), _closest_ref_len(len(hyp), refs))
    return bp * math.exp(log_p)


def corpus_bleu(hypotheses: Iterable[str | Sequence[str]], references: Iterable, max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` in [0, 1]: n-gram matches and lengths summed over all pairs.

    ``references[i]`` is a string / token list, or a list of those, for ``hypotheses[i]``.
    """
    hyps = list(hypotheses)
    refs_all = list(references)
    if len(hyps) != len(refs_all):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs_all)} reference sets")
    sum_m = [0] * max_n
    sum_t = [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs_all):
        ht = _as_tokens(h)
        rs = _refs_for(h, r)
        m, t = _clipped_counts(ht, rs, max_n)
        sum_m = [a + b for a, b in zip(sum_m, m)]
        sum_t = [a + b for a, b in zip(sum_t, t)]
        hyp_len += len(ht)
        ref_len += _closest_ref_len(len(ht), rs)
    if hyp_len == 0 or any(m == 0 for m in sum_m):
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(sum_m, sum_t)) / max_n
    return _brevity_penalty(hyp_len, ref_len) * math.exp(log_p)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str | Sequence[str], reference: str | Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure in [0, 1] (``beta=1``: harmonic mean of LCS precision and recall)."""
    h = _as_tokens(hypothesis)
    r = _as_tokens(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p = lcs / len(h)
    rec = lcs / len(r)
    b2 = beta * beta
    return (1 + b2) * p * rec / (rec + b2 * p)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
