"""AnswerChoicesStop (vla_node/backends/answer_choices.py): a free-text answer compared with a few
texts ends once it can be none of them, through both interfaces the decoding paths use (a logits
processor and the bitmask of the grammar's processor). Real torch tensors, a character tokenizer."""
from __future__ import annotations

import pytest
import torch

from vla_node.backends.answer_choices import AnswerChoicesStop
from vla_node.grammar import allowed_tokens

ALPHABET = ["<eos>"] + list(" abcdefghijklmnopqrstuvwxyz0123456789:[],\"()=\ufffd")
EOS = 0
VOCAB = len(ALPHABET)


def _decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids if i != EOS)


def _ids(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def _stop() -> AnswerChoicesStop:
    return AnswerChoicesStop(_decode, ["no red cube is visible", 'CLARIFY(reason="no red cube is visible")'.lower()],
                             [EOS], VOCAB)


def _masks(answer: str) -> list[torch.Tensor]:
    """The allowed tokens before each token of ``answer`` and after its last, by next_bitmask."""
    stop, prompt = _stop(), torch.tensor([_ids("count")])
    masks = [torch.from_numpy(allowed_tokens(stop.next_bitmask(prompt), VOCAB))]
    for token in _ids(answer):
        masks.append(torch.from_numpy(allowed_tokens(stop.next_bitmask(torch.tensor([[token]])), VOCAB)))
    return masks


def _only_eos(mask: torch.Tensor) -> bool:
    return bool(mask[EOS]) and int(mask.sum()) == 1


def test_an_answer_that_may_still_be_a_choice_is_never_masked():
    for answer in ("no red cube is visible", "  no red", 'clarify(reason="no red cube is visible")',
                   "no red cube is visible  "):  # whitespace after a whole choice: still equal once stripped
        assert all(bool(mask.all()) for mask in _masks(answer)), answer


def test_an_answer_that_departs_from_every_choice_may_only_stop():
    masks = _masks("1 red cube")
    assert bool(masks[0].all())  # nothing generated yet
    assert all(_only_eos(mask) for mask in masks[1:])  # "1" begins no choice
    masks = _masks("no red ball")
    assert all(bool(mask.all()) for mask in masks[:8]) and _only_eos(masks[8])  # "no red b" departs
    assert _only_eos(_masks("no red cube is visible x")[-1])  # more than a choice


def test_an_unfinished_character_waits_for_the_rest():
    assert bool(_masks("1\ufffd")[1].all()) is False  # "1" already departed
    assert bool(_masks("\ufffd")[-1].all())  # a partial character alone decides nothing


def test_the_logits_processor_interface_masks_the_same_way():
    stop, scores = _stop(), torch.randn(1, VOCAB)
    assert torch.equal(stop(torch.tensor([_ids("count")]), scores.clone()), scores)  # the prompt
    prompt_and_answer = _ids("count") + _ids("2")
    masked = stop(torch.tensor([prompt_and_answer]), scores.clone())
    assert masked[0, EOS] == scores[0, EOS] and torch.isinf(masked[0, 1:]).all()


def test_one_answer_at_a_time_and_stop_tokens_that_fit():
    with pytest.raises(ValueError, match="batch of 2"):
        _stop().next_bitmask(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one choice"):
        AnswerChoicesStop(_decode, [], [EOS], VOCAB)
    with pytest.raises(ValueError, match="do not fit"):
        AnswerChoicesStop(_decode, ["x"], [VOCAB], VOCAB)
