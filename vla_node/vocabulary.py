"""The action vocabulary (config/actions.yaml): verbs, their arguments, label allowlists.

Per-verb pydantic models are built from it with create_model; they validate steps and give the
JSON Schema used for constrained decoding.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model

from vla_node.actions import BOX_SUFFIX, STEP_ARGUMENT_FIELDS, ActionError, ActionStep

__all__ = ["ActionError", "VerbSpec", "Vocabulary", "VocabularyError", "default_vocabulary_path"]

ANY = "any"
MAX_LABEL_CHARS = 100
MAX_TEXT_CHARS = 1000
_VERB_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
_LABEL_SEPARATORS = re.compile(r"[\s_\-]+")
_TOP_LEVEL_KEYS = {"version", "verbs", "label_args", "objects", "destinations", "labels_zh", "policy"}
# Which allowlist governs which label argument.
_ALLOWLIST_OF_ARG = {"object": "objects", "destination": "destinations"}


class VocabularyError(ValueError):
    """config/actions.yaml is malformed; the message names the key."""


@dataclass(frozen=True)
class VerbSpec:
    name: str
    args: tuple[str, ...]
    description: str = ""


def _basic_label(text: str) -> str:
    # NFKC folds full-width letters; separators collapse so "Red_Cube", "red-cube" == "red cube".
    return _LABEL_SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def default_vocabulary_path() -> Path:
    """config/actions.yaml: source tree, then the ament share dir, then package data."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "config" / "actions.yaml"]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("vla_node")) / "config" / "actions.yaml")
    except Exception:  # not a ROS install (ImportError) or package not indexed (PackageNotFoundError)
        pass
    candidates.append(here / "config" / "actions.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("config/actions.yaml not found; looked in: " + ", ".join(map(str, candidates)))


class Vocabulary:
    """Immutable after construction. Build with load(path) or from_dict(data)."""

    def __init__(
        self,
        *,
        version: str,
        verbs: dict[str, VerbSpec],
        label_args: tuple[str, ...],
        objects: frozenset[str] | None,
        destinations: frozenset[str] | None,
        labels_zh: dict[str, str] | None = None,
        policy_config: dict | None = None,
        source: Path | None = None,
    ):
        self.version = version
        self.verbs = dict(verbs)
        self.label_args = tuple(label_args)
        self.objects = objects
        self.destinations = destinations
        self.labels_zh = dict(labels_zh or {})
        self.policy_config = dict(policy_config or {})
        self.source = source
        # zh keys are looked up without spaces: "红色 方块" and "红色方块" are the same label.
        self._zh_lookup = {_basic_label(k).replace(" ", ""): v for k, v in self.labels_zh.items()}
        self._models = {name: self._build_model(spec) for name, spec in self.verbs.items()}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None) -> "Vocabulary":
        path = Path(path) if path is not None else default_vocabulary_path()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise VocabularyError(f"{path}: not valid YAML: {exc}") from exc
        try:
            return cls.from_dict(data, source=path)
        except VocabularyError as exc:
            raise VocabularyError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None) -> "Vocabulary":
        if not isinstance(data, dict):
            raise VocabularyError("the vocabulary must be a mapping")
        unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
        if unknown:
            raise VocabularyError(f"unknown top-level keys {unknown} (allowed: {sorted(_TOP_LEVEL_KEYS)})")
        verbs = _read_verbs(data.get("verbs"))
        label_args = _read_label_args(data.get("label_args", ["object", "destination"]))
        objects = _read_allowlist(data.get("objects", ANY), "objects")
        destinations = _read_allowlist(data.get("destinations", ANY), "destinations")
        labels_zh = _read_labels_zh(data.get("labels_zh") or {}, objects, destinations)
        policy = data.get("policy") or {}
        if not isinstance(policy, dict):
            raise VocabularyError("'policy' must be a mapping")
        return cls(
            version=str(data.get("version", "1")),
            verbs=verbs,
            label_args=label_args,
            objects=objects,
            destinations=destinations,
            labels_zh=labels_zh,
            policy_config=policy,
            source=source,
        )

    # ---- labels -------------------------------------------------------------------------------
    def normalise_label(self, text: str) -> str:
        label = _basic_label(text)
        return self._zh_lookup.get(label.replace(" ", ""), label)

    def allowlist_for(self, arg: str) -> frozenset[str] | None:
        """The allowlist governing a label argument; None means any label."""
        which = _ALLOWLIST_OF_ARG.get(arg)
        return getattr(self, which) if which else None

    # ---- models and validation ----------------------------------------------------------------
    def model_for(self, verb: str) -> type[BaseModel]:
        try:
            return self._models[verb]
        except KeyError:
            raise ActionError(f"unknown verb '{verb}'") from None

    def validate_step(self, step: ActionStep) -> ActionStep:
        """Checks a step against its verb; returns a copy with normalised labels."""
        spec = self.verbs.get(step.verb)
        if spec is None:
            raise ActionError(f"unknown verb '{step.verb}' (known: {', '.join(self.verbs)})")
        for field in STEP_ARGUMENT_FIELDS:
            if field not in spec.args and getattr(step, field) != "":
                raise ActionError(f"unexpected argument '{field}' for {spec.name}")
            box_field = field + BOX_SUFFIX
            has_box = getattr(step, box_field, None) is not None
            if has_box and not (field in spec.args and field in self.label_args):
                raise ActionError(f"unexpected argument '{box_field}' for {spec.name}")
        updates: dict[str, str] = {}
        for arg in spec.args:
            value = getattr(step, arg)
            if arg in self.label_args:
                value = self.normalise_label(value)
                updates[arg] = value
            if not value.strip():
                raise ActionError(f"missing argument '{arg}' for {spec.name} (empty value)")
            allowed = self.allowlist_for(arg) if arg in self.label_args else None
            if allowed is not None and value not in allowed:
                raise ActionError(f"{arg} '{value}' is not in the vocabulary's {_ALLOWLIST_OF_ARG[arg]}")
        payload = {"action": spec.name, **{arg: updates.get(arg, getattr(step, arg)) for arg in spec.args}}
        try:
            self._models[spec.name].model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ActionError(f"{spec.name}: argument '{where}': {first['msg']}") from None
        return step.model_copy(update=updates) if updates else step

    def json_schema(self) -> dict:
        """JSON Schema of {"actions": [one object per step, oneOf per verb keyed by "action"]}."""
        models = tuple(self._models.values())
        union = models[0] if len(models) == 1 else Union[models]  # type: ignore[valid-type]
        item = Annotated[union, Field(discriminator="action")]
        wrapper = create_model(
            "ActionList",
            __config__=ConfigDict(extra="forbid"),
            actions=(Annotated[list[item], Field(min_length=1)], ...),  # type: ignore[valid-type]
        )
        return wrapper.model_json_schema()

    def fingerprint(self) -> str:
        """sha256 of everything the model learns from (policy excluded: it does not change outputs)."""
        canonical = {
            "version": self.version,
            "verbs": {n: {"args": list(s.args), "description": s.description} for n, s in self.verbs.items()},
            "label_args": list(self.label_args),
            "objects": sorted(self.objects) if self.objects is not None else ANY,
            "destinations": sorted(self.destinations) if self.destinations is not None else ANY,
            "labels_zh": dict(sorted(self.labels_zh.items())),
        }
        blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _build_model(self, spec: VerbSpec) -> type[BaseModel]:
        fields: dict[str, Any] = {"action": (Literal[spec.name], ...)}
        for arg in spec.args:
            if arg in self.label_args:
                allowed = self.allowlist_for(arg)
                label_type = (
                    Literal[tuple(sorted(allowed))]  # type: ignore[valid-type]
                    if allowed
                    else Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]
                )
                fields[arg] = (label_type, ...)
                # Boxes in the model's coordinate convention: [x1, y1, x2, y2] integers.
                box_type = Optional[Annotated[list[int], Field(min_length=4, max_length=4)]]
                fields[arg + BOX_SUFFIX] = (box_type, None)
            else:
                fields[arg] = (Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)], ...)
        model_name = "".join(part.capitalize() for part in spec.name.split("_")) + "Action"
        return create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)


# ---- YAML readers -------------------------------------------------------------------------------
def _read_verbs(raw: Any) -> dict[str, VerbSpec]:
    if not isinstance(raw, dict) or not raw:
        raise VocabularyError("'verbs' must be a non-empty mapping of VERB_NAME: {args: [...]}")
    verbs: dict[str, VerbSpec] = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not _VERB_NAME.match(name):
            raise VocabularyError(f"verb name {name!r} must be UPPER_SNAKE_CASE")
        body = body or {}
        if not isinstance(body, dict) or set(body) - {"args", "description"}:
            raise VocabularyError(f"verb {name}: expected keys 'args' and 'description', got {body!r}")
        args = body.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise VocabularyError(f"verb {name}: 'args' must be a list of names")
        for arg in args:
            if arg not in STEP_ARGUMENT_FIELDS:
                raise VocabularyError(
                    f"verb {name}: argument '{arg}' is not an ActionStep field {STEP_ARGUMENT_FIELDS}"
                )
        if len(set(args)) != len(args):
            raise VocabularyError(f"verb {name}: duplicate arguments in {args}")
        verbs[name] = VerbSpec(name=name, args=tuple(args), description=str(body.get("description", "")))
    return verbs


def _read_label_args(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise VocabularyError("'label_args' must be a list")
    for arg in raw:
        if arg + BOX_SUFFIX not in ActionStep.model_fields:
            raise VocabularyError(f"label_args: '{arg}' has no '{arg}{BOX_SUFFIX}' field in ActionStep")
    return tuple(raw)


def _read_allowlist(raw: Any, key: str) -> frozenset[str] | None:
    if raw == ANY:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise VocabularyError(f"'{key}' must be \"any\" or a non-empty list of labels")
    labels = [_basic_label(x) for x in raw]
    if "" in labels:
        raise VocabularyError(f"'{key}' contains an empty label")
    return frozenset(labels)


def _read_labels_zh(raw: Any, objects, destinations) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise VocabularyError("'labels_zh' must be a mapping of Chinese label -> canonical label")
    known = None if objects is None or destinations is None else objects | destinations
    mapped: dict[str, str] = {}
    for zh, label in raw.items():
        if not isinstance(zh, str) or not isinstance(label, str):
            raise VocabularyError(f"labels_zh: {zh!r}: {label!r} must map text to text")
        canonical = _basic_label(label)
        if known is not None and canonical not in known:
            raise VocabularyError(f"labels_zh: {zh!r} maps to '{canonical}', which is in neither allowlist")
        mapped[zh] = canonical
    return mapped
