"""Adapter manifest (``vla_manifest.json``): what a LoRA adapter was trained against.

Training writes it next to ``adapter_config.json``; the backend reads it and refuses an adapter
whose base model, family, prompt template, pixel limits, box convention or action vocabulary do
not match what it is serving. Format (SPEC)::

    {"format": 1,
     "base_model": {"name_or_path": str, "config_sha256": str, "model_type": str},
     "family": "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl",
     "template": "vla_node.prompt/v1",
     "image": {"min_pixels": int, "max_pixels": int},
     "coordinate_convention": "absolute_resized" | "normalized_1000",
     "vocabulary": {"version": str, "fingerprint": str},
     "dataset_sha256": str, "metrics": {...}, "created": iso8601,
     "answers": ["actions"] | ["text"] | ["actions", "text"],
     "clarify_threshold": float (optional, in (0, 0.5]),
     "count_questions": bool (optional)}

``answers`` says what the adapter was trained to answer: robot actions, free-form text, or both
(absent in older manifests: actions). The node serves actions, so an adapter trained only on
free-form text is refused (:func:`check_adapter_against_base`, ``require_actions``).
``clarify_threshold`` (a model's or an adapter's, optional): the answer starts with CLARIFY whenever
the answering model gives it at least that probability at the first token (vla_node.clarify_threshold;
written by ``python -m training.calibrate_clarify``); an adapter never inherits its base's.
``count_questions`` (a base model's, optional): the model was trained to answer the counting question
(vla_node.prompt.count_question), so the node may ask it whether the things a plan names are on the
table (vla_node.presence_check), with or without an adapter active; ``training.build_embedded`` writes
it when the base's data had them, and a merged checkpoint (training.merge) keeps its base's.

Pure Python (no torch), so training tools and tests can use it cheaply.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from vla_node.prompt import TEMPLATE_ID, template_id  # the prompt template an adapter was trained with

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "TEMPLATE_ID",
    "prompt_template_of",
    "FAMILIES",
    "COORDINATE_CONVENTIONS",
    "ManifestError",
    "family_of",
    "coordinate_convention_for",
    "coordinate_convention_of",
    "config_sha256",
    "make_manifest",
    "validate_manifest",
    "write_manifest",
    "read_manifest",
    "has_manifest",
    "check_adapter_against_base",
    "read_json_object",
    "ANSWER_KINDS",
    "answers_of",
    "require_action_answers",
    "clarify_threshold_of",
    "answers_count_questions",
]

MANIFEST_NAME = "vla_manifest.json"
ANSWER_KINDS = ("actions", "text")  # what an adapter answers; training.answer_kinds names them
MANIFEST_FORMAT = 1

# model_type (config.json) -> family
FAMILIES: dict[str, str] = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
# family -> how the model writes boxes
COORDINATE_CONVENTIONS: dict[str, str] = {
    "qwen2_vl": "absolute_resized",
    "qwen2_5_vl": "absolute_resized",
    "qwen3_vl": "normalized_1000",
}

# keys dropped (at any depth) before hashing a config: they change with the saving library or
# with the dtype a checkpoint was exported in, not with the architecture/weights layout.
_CONFIG_HASH_EXCLUDE = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match the base model it is used with."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def family_of(model_type: str) -> str:
    """Family name for a config ``model_type``; ManifestError if it is not a supported Qwen-VL."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ManifestError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def coordinate_convention_for(family: str) -> str:
    try:
        return COORDINATE_CONVENTIONS[family]
    except KeyError:
        raise ManifestError(
            f"unknown family {family!r}; expected one of {', '.join(sorted(COORDINATE_CONVENTIONS))}"
        ) from None


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (a config.json, processor config, ...). Raises ValueError
    saying what is wrong (unreadable, not valid JSON, not an object); callers add their context."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _load_config(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    d = Path(model_dir)
    cfg = d / "config.json" if d.is_dir() or not d.name.endswith(".json") else d
    if not cfg.is_file():
        raise ManifestError(f"{cfg}: base model config.json not found")
    try:
        return cfg, read_json_object(cfg)
    except ValueError as e:
        raise ManifestError(f"{cfg}: cannot read base model config: {e}") from None


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _CONFIG_HASH_EXCLUDE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def config_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of the base model's ``text_config`` + ``vision_config`` as canonical JSON.

    Canonical = sorted keys, compact separators, ``_name_or_path``, ``transformers_version``,
    ``torch_dtype``/``dtype`` removed. A flat (pre-transformers-5, e.g. original Qwen2-VL hub)
    config without ``text_config`` uses its top-level keys minus ``vision_config`` as text config.
    ``model_dir`` may be the checkpoint directory or its config.json.
    """
    _, data = _load_config(model_dir)
    vision = data.get("vision_config") or {}
    text = data.get("text_config")
    if text is None:
        text = {k: v for k, v in data.items() if k != "vision_config"}
    canon = json.dumps(
        {"text_config": _strip(text), "vision_config": _strip(vision)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# build / validate / write / read
# --------------------------------------------------------------------------------------------


def make_manifest(
    base_dir: str | os.PathLike,
    *,
    min_pixels: int,
    max_pixels: int,
    vocabulary_version: str,
    vocabulary_fingerprint: str,
    dataset_sha256: str = "",
    metrics: Mapping[str, Any] | None = None,
    template: str = TEMPLATE_ID,
    name_or_path: str | None = None,
    created: str | None = None,
    answers: list[str] | tuple[str, ...] = ("actions",),
    coordinate_convention: str | None = None,
) -> dict:
    """Build a validated manifest dict for an adapter trained on the checkpoint at ``base_dir``.

    ``family`` and ``model_type`` are derived from the base config; ``coordinate_convention`` is the
    one the training data's boxes were written in (default: the family's native one).
    """
    cfg_path, data = _load_config(base_dir)
    model_type = data.get("model_type", "")
    family = family_of(model_type)
    manifest = {
        "format": MANIFEST_FORMAT,
        "base_model": {
            "name_or_path": str(name_or_path if name_or_path is not None else base_dir),
            "config_sha256": config_sha256(cfg_path),
            "model_type": model_type,
        },
        "family": family,
        "template": template,
        "image": {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)},
        "coordinate_convention": coordinate_convention or coordinate_convention_for(family),
        "vocabulary": {"version": str(vocabulary_version), "fingerprint": str(vocabulary_fingerprint)},
        "dataset_sha256": dataset_sha256,
        "metrics": dict(metrics or {}),
        "created": created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "answers": sorted(set(answers)),
    }
    return validate_manifest(manifest)


def _need(d: Mapping, key: str, typ, where: str, src: str):
    if key not in d:
        raise ManifestError(f"{src}: missing field '{where}{key}'")
    v = d[key]
    if typ is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, typ)
    if not ok:
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(f"{src}: field '{where}{key}' must be {tname}, got {type(v).__name__} {v!r}")
    return v


def validate_manifest(data: Any, source: str | os.PathLike = "manifest") -> dict:
    """Check the structure of a manifest dict; return it unchanged or raise ManifestError."""
    src = str(source)
    if not isinstance(data, dict):
        raise ManifestError(f"{src}: manifest must be a JSON object, got {type(data).__name__}")
    fmt = _need(data, "format", int, "", src)
    if fmt != MANIFEST_FORMAT:
        raise ManifestError(f"{src}: field 'format' = {fmt} is not supported (expected {MANIFEST_FORMAT})")
    base = _need(data, "base_model", dict, "", src)
    _need(base, "name_or_path", str, "base_model.", src)
    sha = _need(base, "config_sha256", str, "base_model.", src)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{src}: field 'base_model.config_sha256' is not a sha256 hex digest: {sha!r}")
    _need(base, "model_type", str, "base_model.", src)
    family = _need(data, "family", str, "", src)
    if family not in COORDINATE_CONVENTIONS:
        raise ManifestError(
            f"{src}: field 'family' = {family!r} is not one of {', '.join(sorted(COORDINATE_CONVENTIONS))}"
        )
    _need(data, "template", str, "", src)
    image = _need(data, "image", dict, "", src)
    mn = _need(image, "min_pixels", int, "image.", src)
    mx = _need(image, "max_pixels", int, "image.", src)
    if mn <= 0 or mx <= 0 or mn > mx:
        raise ManifestError(f"{src}: field 'image' needs 0 < min_pixels <= max_pixels, got {mn}, {mx}")
    conv = _need(data, "coordinate_convention", str, "", src)
    if conv not in set(COORDINATE_CONVENTIONS.values()):
        raise ManifestError(f"{src}: field 'coordinate_convention' = {conv!r} is unknown")
    vocab = _need(data, "vocabulary", dict, "", src)
    _need(vocab, "version", str, "vocabulary.", src)
    _need(vocab, "fingerprint", str, "vocabulary.", src)
    _need(data, "dataset_sha256", str, "", src)
    _need(data, "metrics", dict, "", src)
    created = _need(data, "created", str, "", src)
    try:
        _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(f"{src}: field 'created' = {created!r} is not an ISO 8601 timestamp") from None
    if "answers" in data:
        answers = data["answers"]
        if not isinstance(answers, list) or not answers or any(a not in ANSWER_KINDS for a in answers):
            raise ManifestError(f"{src}: field 'answers' = {answers!r} must be a non-empty list of "
                                f"{', '.join(repr(k) for k in ANSWER_KINDS)}")
    if "clarify_threshold" in data:
        threshold = data["clarify_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 0.5:
            raise ManifestError(f"{src}: field 'clarify_threshold' = {threshold!r} must be a number in (0, 0.5]")
    if "count_questions" in data and not isinstance(data["count_questions"], bool):
        raise ManifestError(f"{src}: field 'count_questions' = {data['count_questions']!r} must be true or false")
    return data


def answers_of(manifest: Mapping[str, Any]) -> list[str]:
    """What an adapter answers; manifests written before the field existed describe action adapters."""
    return list(manifest.get("answers", ["actions"]))


def require_action_answers(manifest: Mapping[str, Any], source: str | os.PathLike = "adapter manifest") -> None:
    """Raise ManifestError unless the adapter answers with actions (what the node serves)."""
    if "actions" not in answers_of(manifest):
        raise ManifestError(
            f"{source}: field 'answers' = {answers_of(manifest)!r}: the adapter was trained only on free-form "
            "text answers and cannot answer with robot actions, which the node needs; train it on an action "
            "dataset too (a comma-separated dataset: mixes both), and score free-form skills with vla-eval")


def _manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def has_manifest(adapter_dir: str | os.PathLike) -> bool:
    return _manifest_path(adapter_dir).is_file()


def write_manifest(adapter_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Validate and write ``manifest`` to ``adapter_dir/vla_manifest.json``; return the file path."""
    data = validate_manifest(dict(manifest), source=_manifest_path(adapter_dir))
    d = Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = d / MANIFEST_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """Read + validate the manifest of an adapter directory (or the manifest file itself)."""
    p = _manifest_path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: manifest not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: cannot read manifest: {e}") from None
    return validate_manifest(data, source=p)


# --------------------------------------------------------------------------------------------
# compatibility check
# --------------------------------------------------------------------------------------------

# keys accepted in `expected` -> (manifest field path for messages, getter)
_EXPECTED_FIELDS = {
    "family": ("family", lambda m: m["family"]),
    "template": ("template", lambda m: m["template"]),
    "min_pixels": ("image.min_pixels", lambda m: m["image"]["min_pixels"]),
    "max_pixels": ("image.max_pixels", lambda m: m["image"]["max_pixels"]),
    "coordinate_convention": ("coordinate_convention", lambda m: m["coordinate_convention"]),
    "vocabulary_fingerprint": ("vocabulary.fingerprint", lambda m: m["vocabulary"]["fingerprint"]),
    "vocabulary_version": ("vocabulary.version", lambda m: m["vocabulary"]["version"]),
}


def coordinate_convention_of(model_dir: str | os.PathLike) -> str:
    """The convention the boxes of the checkpoint in ``model_dir`` are written in: its manifest's (the one
    its training data used: the embedded Qwen3-VL model answers in its input's pixels), else its family's
    native one (any other Qwen-VL checkpoint)."""
    if has_manifest(model_dir):
        return read_manifest(model_dir)["coordinate_convention"]
    _, cfg = _load_config(model_dir)
    return coordinate_convention_for(family_of(cfg.get("model_type", "")))


def clarify_threshold_of(model_dir: str | os.PathLike) -> float | None:
    """The calibrated CLARIFY threshold of the checkpoint in ``model_dir`` (its manifest's), or None
    (no manifest, or none calibrated: greedy decoding decides alone)."""
    if not model_dir or not has_manifest(model_dir):
        return None
    threshold = read_manifest(model_dir).get("clarify_threshold")
    return None if threshold is None else float(threshold)


def prompt_template_of(model_dir: str | os.PathLike) -> str:
    """The prompt template the checkpoint in ``model_dir`` was trained with: its manifest's (a model
    fine-tuned by vla-train carries one), else the full template (any other Qwen-VL checkpoint)."""
    if not model_dir or not has_manifest(model_dir):
        return TEMPLATE_ID
    manifest = read_manifest(model_dir)
    try:
        return template_id(manifest["template"])
    except ValueError as e:
        raise ManifestError(f"{_manifest_path(model_dir)}: {e}; this vla_node cannot prompt the model as it was "
                            "trained") from None


def check_adapter_against_base(
    manifest: Mapping[str, Any] | str | os.PathLike,
    base_dir: str | os.PathLike,
    expected: Mapping[str, Any] | None = None,
    *,
    source: str | os.PathLike | None = None,
    require_actions: bool = True,
) -> None:
    """Raise ManifestError unless the adapter described by ``manifest`` fits the base at ``base_dir``.

    Always checked against the base checkpoint on disk: ``base_model.config_sha256``,
    ``base_model.model_type``, ``family`` (derived from the base config's model_type) and
    ``coordinate_convention`` (the base's: coordinate_convention_of). ``expected`` may add (keys, all optional, ``None`` = not checked):
    ``family``, ``template``, ``min_pixels``, ``max_pixels``, ``coordinate_convention``,
    ``vocabulary_fingerprint``, ``vocabulary_version``.

    ``manifest`` is a dict or an adapter dir / manifest path (then read + validated here). The
    error names the manifest (``source`` or the path), the field, and both values.
    ``require_actions`` (the node) refuses an adapter trained only on free-form answers.
    """
    if isinstance(manifest, (str, os.PathLike)):
        src = str(_manifest_path(manifest))
        m = read_manifest(manifest)
    else:
        src = str(source) if source is not None else "adapter manifest"
        m = validate_manifest(dict(manifest), source=src)
    expected = dict(expected or {})
    unknown = set(expected) - set(_EXPECTED_FIELDS)
    if unknown:
        raise ValueError(f"unknown expected key(s) {sorted(unknown)}; known: {sorted(_EXPECTED_FIELDS)}")

    def mismatch(field: str, got: Any, want: Any, what: str) -> ManifestError:
        return ManifestError(f"{src}: field '{field}' = {got!r} does not match {what} {want!r}")

    if require_actions:
        require_action_answers(m, src)

    cfg_path, cfg = _load_config(base_dir)
    base_sha = config_sha256(cfg_path)
    if m["base_model"]["config_sha256"] != base_sha:
        raise mismatch(
            "base_model.config_sha256",
            m["base_model"]["config_sha256"],
            base_sha,
            f"base model {base_dir} (trained for {m['base_model']['name_or_path']!r}); config_sha256",
        )
    base_type = cfg.get("model_type", "")
    if m["base_model"]["model_type"] != base_type:
        raise mismatch(
            "base_model.model_type", m["base_model"]["model_type"], base_type, f"base model {base_dir} model_type"
        )
    base_family = FAMILIES.get(base_type)
    if base_family is None:
        raise ManifestError(f"{cfg_path}: unsupported base model_type {base_type!r}")
    if m["family"] != base_family:
        raise mismatch("family", m["family"], base_family, f"base model {base_dir} family")
    conv = coordinate_convention_of(base_dir)
    if m["coordinate_convention"] != conv:
        raise mismatch("coordinate_convention", m["coordinate_convention"], conv, f"base model {base_dir} convention")

    for key, want in expected.items():
        if want is None:
            continue
        field, get = _EXPECTED_FIELDS[key]
        got = get(m)
        if got != want:
            raise mismatch(field, got, want, "expected")


def answers_count_questions(model_dir: str | os.PathLike) -> bool:
    """Whether the checkpoint in ``model_dir`` was trained on the counting question (its manifest says
    ``count_questions: true``); no manifest or no field: it was not."""
    if not model_dir or not has_manifest(model_dir):
        return False
    return read_manifest(model_dir).get("count_questions") is True
