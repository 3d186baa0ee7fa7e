"""Safety gate between the parser and the planner: allowlists, confidence, plan length, workspace.

Every refusal names the rule (the config key) and the offending value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vla_node.actions import ActionStep, Box
from vla_node.vocabulary import Vocabulary

_KEYS = (
    "allowed_verbs",
    "allowed_objects",
    "allowed_destinations",
    "min_confidence",
    "max_steps",
    "require_boxes_inside_image",
)
# Stopping is always safe, so a hesitant STOP is still obeyed.
_CONFIDENCE_EXEMPT_VERBS = frozenset({"STOP"})
_EDGE_TOLERANCE_PX = 1e-6


@dataclass(frozen=True)
class PolicyViolation:
    rule: str  # the policy key that refused, e.g. "allowed_verbs"
    value: Any  # the offending value, e.g. "THROW"
    message: str  # human-readable, names rule and value
    step: int | None = None  # 1-based step number, None for plan-level rules


@dataclass
class SafetyPolicy:
    allowed_verbs: frozenset[str] | None = None  # None = all verbs of the vocabulary
    allowed_objects: frozenset[str] | None = None  # None = any (the vocabulary already limits labels)
    allowed_destinations: frozenset[str] | None = None
    min_confidence: float = 0.0
    max_steps: int = 8
    require_boxes_inside_image: bool = True

    @classmethod
    def from_config(cls, cfg: dict | None, vocab: Vocabulary) -> "SafetyPolicy":
        """The `policy:` section of config/actions.yaml (vocab.policy_config), possibly with node overrides."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown policy keys {unknown} (known: {', '.join(_KEYS)})")
        verbs = _read_set(cfg.get("allowed_verbs", "all"), "allowed_verbs", ("all",), str)
        if verbs is not None and verbs - set(vocab.verbs):
            raise ValueError(f"allowed_verbs: {sorted(verbs - set(vocab.verbs))} are not vocabulary verbs")
        objects = _read_labels(cfg.get("allowed_objects", "any"), "allowed_objects", vocab, vocab.objects)
        destinations = _read_labels(
            cfg.get("allowed_destinations", "any"), "allowed_destinations", vocab, vocab.destinations
        )
        min_confidence = cfg.get("min_confidence", 0.0)
        if not _is_number(min_confidence) or not 0 <= min_confidence <= 1:
            raise ValueError(f"min_confidence must be a number in 0..1, got {min_confidence!r}")
        max_steps = cfg.get("max_steps", 8)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        inside = cfg.get("require_boxes_inside_image", True)
        if not isinstance(inside, bool):
            raise ValueError(f"require_boxes_inside_image must be true or false, got {inside!r}")
        return cls(verbs, objects, destinations, float(min_confidence), max_steps, inside)

    def evaluate(self, steps: list[ActionStep], image_size: tuple[int, int]) -> PolicyViolation | None:
        """The first violated rule, or None when the plan may be executed. image_size is (width, height)."""
        if not steps:
            return PolicyViolation("non_empty_plan", 0, "plan has no steps (non_empty_plan)")
        if len(steps) > self.max_steps:
            message = f"plan has {len(steps)} steps, more than max_steps={self.max_steps}"
            return PolicyViolation("max_steps", len(steps), message)
        for number, step in enumerate(steps, start=1):
            violation = self._check_step(step, number, image_size)
            if violation is not None:
                return violation
        return None

    def check(self, steps: list[ActionStep], image_size: tuple[int, int]) -> str | None:
        """None when allowed, else the refusing rule, e.g. "step 1: verb 'THROW' not in allowed_verbs"."""
        violation = self.evaluate(steps, image_size)
        return None if violation is None else violation.message

    def _check_step(self, step: ActionStep, number: int, image_size: tuple[int, int]) -> PolicyViolation | None:
        def refuse(rule: str, value: Any, what: str) -> PolicyViolation:
            return PolicyViolation(rule, value, f"step {number}: {what}", number)

        if self.allowed_verbs is not None and step.verb not in self.allowed_verbs:
            return refuse("allowed_verbs", step.verb, f"verb '{step.verb}' not in allowed_verbs")
        if step.object and self.allowed_objects is not None and step.object not in self.allowed_objects:
            return refuse("allowed_objects", step.object, f"object '{step.object}' not in allowed_objects")
        destinations = self.allowed_destinations
        if step.destination and destinations is not None and step.destination not in destinations:
            return refuse(
                "allowed_destinations", step.destination, f"destination '{step.destination}' not in allowed_destinations"
            )
        if step.verb not in _CONFIDENCE_EXEMPT_VERBS and step.confidence < self.min_confidence:
            return refuse(
                "min_confidence", step.confidence,
                f"confidence {step.confidence:.3f} below min_confidence {self.min_confidence:.3f}",
            )
        if self.require_boxes_inside_image:
            for name in ("object_box", "destination_box"):
                box = getattr(step, name)
                if box is not None and not _inside(box, image_size):
                    width, height = image_size
                    return refuse(
                        "require_boxes_inside_image", box.as_list(),
                        f"{name} {box.as_list()} is not inside the {width}x{height} image (require_boxes_inside_image)",
                    )
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inside(box: Box, image_size: tuple[int, int]) -> bool:
    width, height = image_size
    tolerance = _EDGE_TOLERANCE_PX
    return (
        -tolerance <= box.x_min and box.x_max <= width + tolerance
        and -tolerance <= box.y_min and box.y_max <= height + tolerance
    )


def _read_set(raw: Any, key: str, everything: tuple[str, ...], kind: type) -> frozenset | None:
    if raw is None or raw in everything:
        return None
    if not isinstance(raw, (list, tuple, set, frozenset)) or not all(isinstance(x, kind) for x in raw):
        raise ValueError(f"{key} must be {' or '.join(repr(e) for e in everything)} or a list, got {raw!r}")
    return frozenset(raw)


def _read_labels(raw: Any, key: str, vocab: Vocabulary, allowlist: frozenset[str] | None) -> frozenset[str] | None:
    labels = _read_set(raw, key, ("any",), str)
    if labels is None:
        return None
    labels = frozenset(vocab.normalise_label(label) for label in labels)
    if allowlist is not None and labels - allowlist:
        raise ValueError(f"{key}: {sorted(labels - allowlist)} are not in the vocabulary's allowlist")
    return labels
