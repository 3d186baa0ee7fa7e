"""Before a multi-step plan is published, ask the model whether each thing it names is on the table.

A small model's plan for "put the blue cylinder in the green box, then the red cone in it too" can act
on a blue cylinder that is not there (a look-alike's box, or empty table): checking every thing of a
multi-step command is a step its one greedy answer skips. A base trained with training/synth_count
answers the counting question about one thing at a time (``Count: "blue cylinder"`` -> ``no blue
cylinder is visible`` / ``1 blue cylinder is visible: [..]``) and gets it right where its plan did not
(models/README.md, item 16). When it says a named thing is absent, the plan becomes the CLARIFY it
should have been, with the same reason.

Only plans of two or more acting steps are checked: on one-step plans the check caught nothing the
plan missed and turned one right answer into a needless question (test_en, 273 one-step plans).
Pure Python: the backend runs the questions (GenerationRequest.free_text: no action grammar, no
CLARIFY threshold).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from vla_node.actions import ActionStep, StepVocabulary, render_step
from vla_node.backends.base import Backend, GenerationRequest
from vla_node.prompt import PromptBuilder, absent_reason

__all__ = ["ABSENT_ANSWER_TOKENS", "MIN_ACTING_STEPS", "PresenceCheck", "absent_answers", "check_presence",
           "named_things", "needs_check", "says_absent"]

# "no blue cylinder is visible" or, from a model whose adapter answers everything as an action,
# 'CLARIFY(reason="no blue cylinder is visible")' (or its reason and closing only): well under this many tokens (a present thing's
# answer ends at its first token that departs from both: GenerationRequest.answer_choices)
ABSENT_ANSWER_TOKENS = 24


@dataclass(frozen=True)
class PresenceCheck:
    """What checking one plan found: the first named thing the model says is absent (None: none)."""

    absent: str | None
    confidence: float  # the absent thing's counting answer's (1.0 when none is absent)
    asked: int  # questions asked
    ms: float  # spent on them (preprocessing + generation)

    @property
    def reason(self) -> str:
        return absent_reason(self.absent or "")


MIN_ACTING_STEPS = 2  # plans with fewer acting steps are not checked (module docstring: measured)


def needs_check(steps: list[ActionStep]) -> bool:
    """A plan of at least MIN_ACTING_STEPS steps that act on named things (a CLARIFY does not)."""
    return sum(1 for step in steps if step.verb != "CLARIFY" and (step.object or step.destination)) >= MIN_ACTING_STEPS


def named_things(steps: list[ActionStep]) -> list[str]:
    """The objects and destinations an acting plan names, each once, in plan order."""
    seen: dict[str, None] = {}
    for step in steps:
        for noun in (step.object, step.destination):
            if noun:
                seen.setdefault(noun, None)
    return list(seen)


def absent_answers(noun: str, vocab: StepVocabulary) -> tuple[str, str, str]:
    """The answers that say ``noun`` is not on the table: in the counting task's words, as the CLARIFY
    with the same reason (what an adapter trained only on actions answers), rendered by
    vla_node.actions as every model answer is, and as that reason with the CLARIFY's closing but not
    its opening (session 34's adapter: ``no blue cylinder is visible")``, the two tasks' words mixed)."""
    reason = absent_reason(noun)
    clarify = render_step(ActionStep(verb="CLARIFY", reason=reason), vocab)
    return reason, clarify, reason + clarify[clarify.rindex(reason) + len(reason):]


def says_absent(answer: str, noun: str, vocab: StepVocabulary) -> bool:
    """The counting answer is one of absent_answers (whitespace around it aside)."""
    return _is_one_of(answer, absent_answers(noun, vocab))


def _is_one_of(answer: str, choices: tuple[str, ...]) -> bool:
    return answer.strip() in choices


def check_presence(backend: Backend, prompt: PromptBuilder, image: np.ndarray, steps: list[ActionStep],
                   stop_event: threading.Event | None = None) -> PresenceCheck:
    """Ask the counting question for every thing the plan names (one request each, in order, on the
    fitted image the plan was answered on) and stop at the first the model says is absent. Each
    answer ends as soon as it can no longer say so (GenerationRequest.answer_choices): a present
    thing's count and boxes are never decoded. Backend errors propagate: the caller decides what a
    failed check means."""
    spent, asked = 0.0, 0
    for noun in named_things(steps):
        absent = absent_answers(noun, prompt.vocab)  # made once: the request's choices and the verdict's
        request = GenerationRequest(image=image, messages=prompt.count_messages(noun),
                                    max_new_tokens=ABSENT_ANSWER_TOKENS, stop_event=stop_event, free_text=True,
                                    answer_choices=absent)
        result = backend.generate(request)
        asked += 1
        spent += result.preprocess_ms + result.generate_ms
        if _is_one_of(result.text, absent):
            return PresenceCheck(noun, result.confidence, asked, spent)
        if stop_event is not None and stop_event.is_set():
            break
    return PresenceCheck(None, 1.0, asked, spent)
