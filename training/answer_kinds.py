"""Which datasets answer with robot actions and which in free-form text.

The node serves actions; a LoRA adapter may also learn free-form answers (visual question answering,
captions, recognition), as LLaMA-Factory's datasets hold. How a dataset is known as one or the other:

1. its dataset_info.json entry says so: ``"vla_answers": "actions"`` or ``"vla_answers": "text"``
   (LLaMA-Factory ignores keys it does not know, so the entry still loads there);
2. otherwise by its answers: every assistant answer parses as actions (vla_node.parser) -> actions;
   more than half do -> still actions, the others are reported as likely typos (fix them, or declare
   the dataset ``"text"``); half or fewer -> free-form text.

Only action datasets have their answers checked by the action parser; free-form samples keep their
own system prompt in training (the serving prompt is for action samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from vla_node.dataset_format import ANSWERS_MARKER as MARKER  # the dataset_info.json entry key
from vla_node.manifest import ANSWER_KINDS as KINDS

__all__ = ["ACTIONS", "TEXT", "KINDS", "MARKER", "Verdict", "classify", "parses_as_actions"]

ACTIONS, TEXT = KINDS


@dataclass(frozen=True)
class Verdict:
    kind: str  # ACTIONS | TEXT
    parsed: int  # answers that parse as actions
    answers: int  # assistant answers in all
    declared: bool  # from the dataset_info.json marker

    @property
    def answers_need_checking(self) -> bool:
        """An action dataset whose answers were not all parsed already (declared, or some failed):
        classify() parsed every answer of an undeclared one, so a second pass could find nothing."""
        return self.kind == ACTIONS and (self.declared or self.parsed < self.answers)

    @property
    def typo_hint(self) -> str:
        """Appended to each rejected answer of a dataset that is actions by its content only."""
        if self.declared or self.kind != ACTIONS or self.parsed == self.answers:
            return ""
        return (f" (likely a typo: {self.parsed} of {self.answers} answers of this dataset parse as actions; "
                f"if it is free-form, declare it with \"{MARKER}\": \"{TEXT}\" in dataset_info.json)")

    def describe(self) -> str:
        how = "declared in dataset_info.json" if self.declared else \
            f"{self.parsed} of {self.answers} answers parse as actions"
        return f"{'actions' if self.kind == ACTIONS else 'free-form text'} ({how})"


def parses_as_actions(text: str, vocab) -> bool:
    from vla_node.parser import ParseError, parse_actions

    try:
        parse_actions(text, vocab)
    except (ParseError, ValueError):  # ValueError: ActionError and pydantic errors
        return False
    return True


def classify(answers: Iterable[str], vocab, declared: Optional[str] = None,
             parse_all: Optional[Callable[[list[str], Any], list[bool]]] = None) -> Verdict:
    """The kind of a dataset from its assistant answers (or its declaration, then not parsed);
    ``parse_all(texts, vocab)``: parses_as_actions of every text, another way (in worker processes)."""
    if declared is not None:
        if declared not in KINDS:
            raise ValueError(f"\"{MARKER}\" must be {' or '.join(repr(k) for k in KINDS)}, not {declared!r}")
        return Verdict(declared, 0, 0, True)
    texts = [a for a in answers if a.strip()]
    parsed = sum(parse_all(texts, vocab) if parse_all is not None else (parses_as_actions(a, vocab) for a in texts))
    kind = ACTIONS if texts and parsed * 2 > len(texts) else TEXT
    return Verdict(kind, parsed, len(texts), False)
