"""LLaMA-Factory ShareGPT (multimodal) datasets: read, validate with file:line:col, write.

Three on-disk shapes are read, as JSON (a list of samples) or JSONL (one sample per line): the two
ShareGPT ones, and LLaMA-Factory's alpaca one (``{"instruction", "input", "output", "system",
"history", "images"}``, converted as LLaMA-Factory converts it: history pairs, then instruction and
input joined by a newline as the user turn, then output):

    {"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", ...}],
     "images": ["images/0001.png"]}
    {"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", ...}],
     "images": [...], "system": "..."}

A dataset directory holds ``dataset_info.json``; its entries are read like LLaMA-Factory reads
them (``formatting``, ``columns``, ``tags``, ``file_name`` relative to the directory, with the
same defaults as LLaMA-Factory's DatasetAttr), so an existing registration works as is. Image
paths are relative to the dataset directory (LLaMA-Factory's ``media_dir`` default) or absolute.

Every problem is reported BEFORE training as ``file:line:col: message``, pointing at the
offending element (the message, its content, the image) when the JSON can be located.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from json.decoder import scanstring
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

# Written by the runtime's dataset_format (vla-replay exports datasets too); read here.
from vla_node.dataset_format import DATASET_INFO, sharegpt_registration, write_sharegpt

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_TAG",
    "DATASET_INFO",
    "Mapping",
    "Sample",
    "DataError",
    "DatasetInvalid",
    "SampleList",
    "read_dataset_info",
    "resolve_dataset",
    "read_samples",
    "load_file",
    "load_dataset_dir",
    "validate",
    "validate_sample",
    "load_validated",
    "dataset_sha256",
    "write_sharegpt",
    "sharegpt_registration",
]

IMAGE_TAG = "<image>"  # LLaMA-Factory's placeholder; == vla_node.prompt.IMAGE_PLACEHOLDER
MEDIA_TAGS = ("<video>", "<audio>")  # LLaMA-Factory's other placeholders: refused
JSON_SUFFIXES = (".json", ".jsonl")

# Normalised roles (LLaMA-Factory's Role values).
USER, ASSISTANT, SYSTEM, OBSERVATION, FUNCTION = "user", "assistant", "system", "observation", "function"

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Column / tag mapping (LLaMA-Factory dataset_info.json entry)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """Columns and role tags of one ShareGPT dataset (LLaMA-Factory's DatasetAttr subset).

    The defaults are LLaMA-Factory's: a registration without ``columns.images`` loads no images.
    """

    messages: str = "conversations"
    images: Optional[str] = None
    system: Optional[str] = None
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: Optional[str] = "system"
    # "actions" | "text" when the entry declares it (training.answer_kinds.MARKER), else None
    answers: Optional[str] = None
    # columns of a file read without a registration that hold video or audio (refused per sample)
    videos: Optional[str] = None
    audios: Optional[str] = None
    # registered columns this reader does not use (e.g. tools, kto_tag): warned about
    unused: tuple = ()
    # "alpaca" (instruction/input/output columns, LLaMA-Factory's default formatting) or "sharegpt"
    formatting: str = "sharegpt"
    prompt: Optional[str] = "instruction"
    query: Optional[str] = "input"
    response: Optional[str] = "output"
    history: Optional[str] = None

    @classmethod
    def from_dataset_info(cls, entry: dict) -> "Mapping":
        """Build from a dataset_info.json entry (``{"formatting":..., "columns":..., "tags":...}``).

        Raises ValueError for entries this reader cannot load (alpaca formatting, ranking data,
        video or audio columns).
        """
        if not isinstance(entry, dict):
            raise ValueError("dataset_info.json entry must be an object")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("sharegpt", "openai", "alpaca"):
            raise ValueError(f"formatting {formatting!r} is not supported (only 'sharegpt', 'openai' and 'alpaca')")
        if entry.get("ranking"):
            raise ValueError("ranking (preference) datasets are not supported")
        columns = entry.get("columns") or {}
        tags = entry.get("tags") or {}
        if not isinstance(columns, dict) or not isinstance(tags, dict):
            raise ValueError("'columns' and 'tags' must be objects")
        for media in ("videos", "audios"):
            if columns.get(media):
                raise ValueError(f"column {media!r} (\"{columns[media]}\"): {media[:-1]} is not supported, the node "
                                 "serves single camera frames; train on images (one <image> per frame)")
        kwargs: dict[str, Any] = {}
        used = ("prompt", "query", "response", "history", "images", "system") if formatting == "alpaca" \
            else ("messages", "images", "system")
        kwargs["unused"] = tuple(sorted(k for k, v in columns.items() if v and k not in used))
        if formatting == "alpaca":
            kwargs["formatting"] = "alpaca"
            for key in ("prompt", "query", "response", "history"):
                if key in columns:
                    kwargs[key] = columns[key]
        if "vla_answers" in entry:
            kwargs["answers"] = entry["vla_answers"]
        if formatting == "openai":  # role/content/user/assistant unless the tags say otherwise
            kwargs.update(messages="messages", role_tag="role", content_tag="content", user_tag="user",
                          assistant_tag="assistant", function_tag="function")
        for key in ("messages", "images", "system"):
            if key in columns:
                kwargs[key] = columns[key]
        for key in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                    "function_tag", "system_tag"):
            if key in tags:
                kwargs[key] = tags[key]
        if not isinstance(kwargs.get("messages", "x"), str):
            raise ValueError("columns.messages must be a string")
        return cls(**kwargs)

    @classmethod
    def detect(cls, sample: Any) -> "Mapping":
        """Guess the mapping of a file read without a registration, from its first sample."""
        if isinstance(sample, dict):
            images = "images" if "images" in sample else None
            system = "system" if "system" in sample else None
            media = {k: k for k in ("videos", "audios") if k in sample}
            if "instruction" in sample and "output" in sample and not {"messages", "conversations"} & set(sample):
                return cls(formatting="alpaca", images=images, system=system,
                           history="history" if "history" in sample else None, **media)
            if "messages" in sample and "conversations" not in sample:
                msgs = sample.get("messages")
                first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
                if "from" in first:
                    return cls(messages="messages", images=images, system=system, **media)
                return replace(cls.openai_style(images=images, system=system), **media)
            return cls(images=images, system=system, **media)
        return cls(images="images")

    @classmethod
    def openai_style(cls, images: Optional[str] = "images", system: Optional[str] = None) -> "Mapping":
        """``messages`` / ``role`` / ``content`` with user/assistant/system roles."""
        return cls(messages="messages", images=images, system=system, role_tag="role",
                   content_tag="content", user_tag="user", assistant_tag="assistant",
                   observation_tag="observation", function_tag="function", system_tag="system")

    def role_map(self) -> dict[str, str]:
        tags = {self.user_tag: USER, self.assistant_tag: ASSISTANT, self.observation_tag: OBSERVATION,
                self.function_tag: FUNCTION}
        if self.system_tag:
            tags[self.system_tag] = SYSTEM
        return tags


def _as_mapping(mapping: Union[None, dict, Mapping]) -> Optional[Mapping]:
    if mapping is None or isinstance(mapping, Mapping):
        return mapping
    if "formatting" not in mapping:
        mapping = dict(mapping, formatting="sharegpt")
    return Mapping.from_dataset_info(mapping)


# --------------------------------------------------------------------------------------------
# Errors and samples
# --------------------------------------------------------------------------------------------


@dataclass
class DataError:
    file: str
    line: int
    column: int
    message: str
    # True when the error cost more than its own sample (a JSON array cut short, an unreadable file).
    fatal: bool = field(default=False, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class DatasetInvalid(Exception):
    """Raised when a dataset has errors; ``errors`` holds all of them, the message the first few."""

    def __init__(self, errors: Sequence[DataError], max_listed: int = 20, what: str = "dataset"):
        self.errors = list(errors)
        shown = [str(e) for e in self.errors[:max_listed]]
        more = len(self.errors) - len(shown)
        lines = [f"{what} is invalid ({len(self.errors)} error{'s' if len(self.errors) != 1 else ''}):"]
        lines += ["  " + s for s in shown]
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


class _Source:
    """The text of one file, shared by its samples, to turn offsets into line:col lazily."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text
        self._line_starts: Optional[list[int]] = None

    def line_col(self, offset: int) -> tuple[int, int]:
        if self._line_starts is None:
            starts = [0]
            find = self.text.find
            i = find("\n")
            while i >= 0:
                starts.append(i + 1)
                i = find("\n", i + 1)
            self._line_starts = starts
        line = bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1


@dataclass
class _Where:
    """Where a sample came from, and the raw JSON paths of its normalised messages."""

    src: _Source
    start: int  # offset of the sample's first character
    mapping: Mapping
    message_paths: list  # per normalised message: JSON path tuple of the raw message
    image_paths: list  # per image: JSON path tuple

    def locate(self, path: tuple = ()) -> tuple[int, int]:
        return self.src.line_col(_find_path(self.src.text, self.start, path))


@dataclass
class Sample:
    """One training conversation, normalised to ``{"role", "content"}`` with LLaMA-Factory roles.

    ``images`` are resolved paths; ``source`` is ``"file:line"`` of the sample's first character.
    A system prompt given in a ``system`` column is the first message here.
    """

    messages: list[dict]
    images: list[Path]
    source: str = ""
    _where: Optional[_Where] = field(default=None, repr=False, compare=False)
    # "actions" | "text" (training.answer_kinds) once the dataset was classified; "" before
    answer_kind: str = field(default="", compare=False)

    @property
    def answers(self) -> list[str]:
        return [m["content"] for m in self.messages if m.get("role") == ASSISTANT]

    def error(self, message: str, path: tuple = ()) -> DataError:
        """A DataError located at ``path`` inside this sample's JSON (see _find_path)."""
        if self._where is not None:
            line, col = self._where.locate(path)
            return DataError(self._where.src.file, line, col, message)
        file, _, line = self.source.rpartition(":")
        if file and line.isdigit():
            return DataError(file, int(line), 1, message)
        return DataError(self.source or "<memory>", 0, 0, message)

    def _message_error(self, index: int, message: str, content: bool = False) -> DataError:
        path: tuple = ()
        if self._where is not None and index < len(self._where.message_paths):
            path = self._where.message_paths[index]
            if content and len(path) == 2:
                path = path + (self._where.mapping.content_tag,)
        return self.error(message, path)

    def _image_error(self, index: int, message: str) -> DataError:
        path: tuple = ()
        if self._where is not None and index < len(self._where.image_paths):
            path = self._where.image_paths[index]
        return self.error(message, path)


class SampleList(list):
    """A list of samples that also says what was dropped (``load_validated(skip_invalid=True)``)."""

    def __init__(self, items: Iterable[Sample] = (), dropped: int = 0, errors: Sequence[DataError] = (),
                 verdict=None, image_sha256: Optional[dict] = None):
        super().__init__(items)
        self.dropped = dropped
        self.errors = list(errors)
        self.verdict = verdict  # training.answer_kinds.Verdict, when answers were classified
        # dataset_sha256 of every image validation read (str(path) -> hex), so a digest of the
        # run's data need not read them again
        self.image_sha256 = image_sha256 if image_sha256 is not None else {}


# --------------------------------------------------------------------------------------------
# Position tracking
# --------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip_ws(s: str, i: int) -> int:
    return _WS.match(s, i).end()


def _find_path(s: str, start: int, path: tuple) -> int:
    """Offset of the JSON value at ``path`` (keys / indexes) below the value starting at ``start``.

    Best effort: when a step of the path cannot be followed, the offset of the deepest value
    reached is returned. Only called on the error path, so speed is secondary.
    """
    i = _skip_ws(s, start)
    try:
        for key in path:
            if isinstance(key, int):
                if s[i] != "[":
                    return i
                j = _skip_ws(s, i + 1)
                if s[j] == "]":
                    return i
                n = 0
                while n < key:
                    j = _skip_ws(s, _DECODER.raw_decode(s, j)[1])
                    if s[j] != ",":
                        return i
                    j = _skip_ws(s, j + 1)
                    n += 1
                i = j
            else:
                if s[i] != "{":
                    return i
                j = _skip_ws(s, i + 1)
                found = None
                while j < len(s) and s[j] == '"':
                    name, j = scanstring(s, j + 1)
                    j = _skip_ws(s, j)
                    if s[j] != ":":
                        return i
                    j = _skip_ws(s, j + 1)
                    if name == key:
                        found = j  # last occurrence wins, like json.loads
                    j = _skip_ws(s, _DECODER.raw_decode(s, j)[1])
                    if s[j] != ",":
                        break
                    j = _skip_ws(s, j + 1)
                if found is None:
                    return i
                i = found
    except (IndexError, ValueError):
        pass
    return i


def _iter_json_array(src: _Source, errors: list[DataError]) -> Iterator[tuple[Any, int]]:
    """Yield (value, start offset) of each element of a top-level JSON array."""
    s = src.text
    i = _skip_ws(s, 0)
    if i >= len(s) or s[i] != "[":
        line, col = src.line_col(i)
        errors.append(DataError(src.file, line, col, "expected a JSON array of samples", fatal=True))
        return
    i = _skip_ws(s, i + 1)
    if i < len(s) and s[i] == "]":
        i = _skip_ws(s, i + 1)
    else:
        while True:
            try:
                value, end = _DECODER.raw_decode(s, i)
            except json.JSONDecodeError as e:
                errors.append(DataError(src.file, e.lineno, e.colno, f"invalid JSON: {e.msg}", fatal=True))
                return
            yield value, i
            i = _skip_ws(s, end)
            if i < len(s) and s[i] == ",":
                i = _skip_ws(s, i + 1)
                continue
            if i < len(s) and s[i] == "]":
                i = _skip_ws(s, i + 1)
                break
            line, col = src.line_col(i)
            what = "end of file" if i >= len(s) else repr(s[i])
            errors.append(DataError(src.file, line, col,
                                    f"invalid JSON: expected ',' or ']' after a sample, found {what}",
                                    fatal=True))
            return
    if i < len(s):
        line, col = src.line_col(i)
        errors.append(DataError(src.file, line, col, "invalid JSON: extra data after the array", fatal=True))


def _iter_json_lines(src: _Source, errors: list[DataError]) -> Iterator[tuple[Any, int]]:
    """Yield (value, start offset in the file) of each non-blank line of a JSONL file."""
    s = src.text
    offset = 0
    lineno = 0
    while offset <= len(s):
        lineno += 1
        nl = s.find("\n", offset)
        line = s[offset:] if nl < 0 else s[offset:nl]
        start = _skip_ws(line, 0)
        if start < len(line):
            try:
                value, stop = _DECODER.raw_decode(line, start)
            except json.JSONDecodeError as e:
                errors.append(DataError(src.file, lineno, e.pos + 1, f"invalid JSON: {e.msg}"))
            else:
                rest = _skip_ws(line, stop)
                if rest < len(line):
                    errors.append(DataError(src.file, lineno, rest + 1,
                                            "invalid JSON: extra data after the sample on this line"))
                else:
                    yield value, offset + start
        if nl < 0:
            break
        offset = nl + 1


# --------------------------------------------------------------------------------------------
# dataset_info.json
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def read_dataset_info(dataset_dir: PathLike) -> tuple[dict, _Source]:
    """Parse ``dataset_dir/dataset_info.json``; raises DatasetInvalid with file:line:col."""
    path = Path(dataset_dir) / DATASET_INFO
    if not path.is_file():
        raise DatasetInvalid([DataError(str(path), 0, 0, "no dataset_info.json in the dataset directory")])
    src = _Source(str(path), _read_text(path))
    try:
        info = json.loads(src.text)
    except json.JSONDecodeError as e:
        raise DatasetInvalid([DataError(src.file, e.lineno, e.colno, f"invalid JSON: {e.msg}")]) from None
    if not isinstance(info, dict):
        raise DatasetInvalid([DataError(src.file, 1, 1, "dataset_info.json must be an object of datasets")])
    return info, src


_WARNED_COLUMNS: set = set()
_UNUSED_COLUMNS = {
    "kto_tag": "KTO labels are ignored, every answer trains as a good one (those tagged undesirable too)",
    "tools": "the tool descriptions are not shown to the model",
    "chosen": "preference pairs are not trained",
    "rejected": "preference pairs are not trained",
}


def resolve_dataset(dataset_dir: PathLike, name: str) -> tuple[list[Path], Mapping]:
    """The files and mapping of dataset ``name`` registered in ``dataset_dir/dataset_info.json``."""
    dataset_dir = Path(dataset_dir)
    info, src = read_dataset_info(dataset_dir)

    def fail(message: str, path: tuple = ()) -> DatasetInvalid:
        line, col = src.line_col(_find_path(src.text, 0, path))
        return DatasetInvalid([DataError(src.file, line, col, message)])

    if name not in info:
        known = ", ".join(sorted(info)) or "none"
        raise fail(f"dataset {name!r} is not registered (registered: {known})")
    entry = info[name]
    try:
        mapping = Mapping.from_dataset_info(entry)
    except ValueError as e:
        raise fail(f"dataset {name!r}: {e}", (name,)) from None
    for column in mapping.unused:
        key = (str(src.file), name, column)
        if key not in _WARNED_COLUMNS:  # once per run, however often the dataset is resolved
            _WARNED_COLUMNS.add(key)
            log.warning("dataset %r: column %r (%r) is not used: %s", name, column, entry["columns"][column],
                        _UNUSED_COLUMNS.get(column, "its values are ignored"))
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                  if k in entry]
        why = f"has {remote[0]} (only local files are read)" if remote else "has no file_name"
        raise fail(f"dataset {name!r} {why}", (name,))
    target = dataset_dir / file_name
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix in JSON_SUFFIXES)
        if not files:
            raise fail(f"dataset {name!r}: directory {target} holds no .json/.jsonl files", (name, "file_name"))
    elif target.is_file():
        if target.suffix not in JSON_SUFFIXES:
            raise fail(f"dataset {name!r}: {target.suffix or 'extensionless'} files are not supported "
                       "(only .json and .jsonl)", (name, "file_name"))
        files = [target]
    else:
        raise fail(f"dataset {name!r}: file_name {file_name!r} not found in {dataset_dir}", (name, "file_name"))
    return files, mapping


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _resolve_image(value: str, media_dir: Path) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    candidate = media_dir / p
    if candidate.exists() or not p.exists():
        return candidate
    return p.resolve()  # LLaMA-Factory falls back to the path as given (relative to the cwd)


def _sharegpt_messages(value: dict, mapping: Mapping, err) -> Optional[tuple[list[dict], list[tuple]]]:
    """A ShareGPT/OpenAI sample's messages (normalised roles) and their JSON paths; None after err()."""
    raw = value.get(mapping.messages)
    if raw is None:
        hint = ""
        for other in ("messages", "conversations"):
            if other != mapping.messages and other in value:
                hint = f" (found {other!r}: check the dataset_info.json columns)"
        err(f"missing messages column {mapping.messages!r}{hint}")
        return None
    if not isinstance(raw, list):
        err(f"column {mapping.messages!r} must be a list of messages", (mapping.messages,))
        return None
    roles = mapping.role_map()
    messages: list[dict] = []
    paths: list[tuple] = []
    for k, msg in enumerate(raw):
        path = (mapping.messages, k)
        if not isinstance(msg, dict):
            err(f"message {k} must be an object", path)
            return None
        if mapping.role_tag not in msg or mapping.content_tag not in msg:
            missing = mapping.role_tag if mapping.role_tag not in msg else mapping.content_tag
            keys = ", ".join(repr(x) for x in msg)
            err(f"message {k} has no {missing!r} key (keys: {keys}; check the dataset_info.json tags)", path)
            return None
        tag = msg[mapping.role_tag]
        if not isinstance(tag, str) or tag not in roles:
            expected = ", ".join(repr(t) for t in roles)
            err(f"message {k} has unknown role {tag!r} (expected one of {expected})", path + (mapping.role_tag,))
            return None
        content = msg[mapping.content_tag]
        if not isinstance(content, str):
            err(f"message {k} content must be a string, got {type(content).__name__}",
                path + (mapping.content_tag,))
            return None
        messages.append({"role": roles[tag], "content": content})
        paths.append(path)
    return messages, paths


def _alpaca_messages(value: dict, mapping: Mapping, err) -> Optional[tuple[list[dict], list[tuple]]]:
    """LLaMA-Factory's alpaca conversion: history pairs, then instruction + "\\n" + input, then output."""
    messages: list[dict] = []
    paths: list[tuple] = []
    history = value.get(mapping.history) if mapping.history else None
    if history is not None:
        if not isinstance(history, list):
            err(f"column {mapping.history!r} must be a list of [instruction, answer] pairs", (mapping.history,))
            return None
        for k, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                err(f"history item {k} must be a pair of strings [instruction, answer]", (mapping.history, k))
                return None
            messages += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
            paths += [(mapping.history, k, 0), (mapping.history, k, 1)]
    query = []
    for column in (mapping.prompt, mapping.query):
        text = value.get(column) if column else None
        if text is not None and not isinstance(text, str):
            err(f"column {column!r} must be a string, got {type(text).__name__}", (column,))
            return None
        if text:
            query.append(text)
    messages.append({"role": USER, "content": "\n".join(query)})
    paths.append((mapping.prompt,))
    answer = value.get(mapping.response) if mapping.response else None
    if not isinstance(answer, str):
        err(f"column {mapping.response!r} (the answer) must be a string, got {type(answer).__name__}",
            (mapping.response,) if answer is not None else ())
        return None
    messages.append({"role": ASSISTANT, "content": answer})
    paths.append((mapping.response,))
    return messages, paths


def _convert(value: Any, start: int, src: _Source, mapping: Mapping, media_dir: Path,
             errors: list[DataError]) -> Optional[Sample]:
    """One raw JSON sample -> Sample, or None with one structural error appended."""

    def err(message: str, path: tuple = ()) -> None:
        line, col = src.line_col(_find_path(src.text, start, path))
        errors.append(DataError(src.file, line, col, message))

    if not isinstance(value, dict):
        err(f"a sample must be a JSON object, got {type(value).__name__}")
        return None
    for media in (mapping.videos, mapping.audios):
        if media and value.get(media):
            err(f"column {media!r}: {media.rstrip('s')} is not supported, the node serves single camera frames; "
                "train on images (one <image> per frame)", (media,))
            return None
    if mapping.formatting == "alpaca":
        converted = _alpaca_messages(value, mapping, err)
        if converted is None:
            return None
        messages, paths = converted
    else:
        converted = _sharegpt_messages(value, mapping, err)
        if converted is None:
            return None
        messages, paths = converted
    if mapping.system and value.get(mapping.system) and not (messages and messages[0]["role"] == SYSTEM):
        system = value[mapping.system]
        if not isinstance(system, str):
            err(f"column {mapping.system!r} must be a string", (mapping.system,))
            return None
        messages.insert(0, {"role": SYSTEM, "content": system})
        paths.insert(0, (mapping.system,))
    images: list[Path] = []
    image_paths: list[tuple] = []
    if mapping.images:
        raw_images = value.get(mapping.images)
        if raw_images is None:
            raw_images = []
        elif isinstance(raw_images, (str, dict)):
            raw_images = [raw_images]
        if not isinstance(raw_images, list):
            err(f"column {mapping.images!r} must be a list of image paths", (mapping.images,))
            return None
        for j, item in enumerate(raw_images):
            p = item.get("path") if isinstance(item, dict) else item
            if not isinstance(p, str) or not p:
                err(f"image {j} must be a path string (or {{\"path\": ...}})", (mapping.images, j))
                return None
            images.append(_resolve_image(p, media_dir))
            image_paths.append((mapping.images, j))
    line, _ = src.line_col(start)
    where = _Where(src, start, mapping, paths, image_paths)
    return Sample(messages, images, f"{src.file}:{line}", where)


def _read_file(path: Path, mapping: Optional[Mapping], media_dir: Path,
               errors: list[DataError]) -> list[Sample]:
    try:
        text = _read_text(path)
    except FileNotFoundError:
        errors.append(DataError(str(path), 0, 0, "file not found", fatal=True))
        return []
    except UnicodeDecodeError as e:
        errors.append(DataError(str(path), 1, 1, f"not UTF-8 text: {e.reason} at byte {e.start}", fatal=True))
        return []
    src = _Source(str(path), text)
    first = _skip_ws(text, 0)
    if first >= len(text):
        errors.append(DataError(src.file, 1, 1, "empty file: no samples", fatal=True))
        return []
    rows = _iter_json_array(src, errors) if text[first] == "[" else _iter_json_lines(src, errors)
    samples = []
    for value, start in rows:
        if mapping is None and isinstance(value, dict):
            mapping = Mapping.detect(value)  # from the first sample that is an object
        sample = _convert(value, start, src, mapping or Mapping(images="images"), media_dir, errors)
        if sample is not None:
            samples.append(sample)
    return samples


def read_samples(path: PathLike, dataset: Optional[str] = None, mapping: Union[None, dict, Mapping] = None,
                 media_dir: Optional[PathLike] = None) -> tuple[list[Sample], list[DataError]]:
    """Read samples without validating them; structural problems come back as errors.

    ``path`` is a .json/.jsonl file, or a dataset directory (or its dataset_info.json) together
    with ``dataset`` (a registered name). Files read directly get ``mapping`` (a dataset_info.json
    entry or a Mapping) or a mapping guessed from the first sample. Relative image paths are
    resolved against ``media_dir`` (default: the dataset directory, or the file's directory).
    A JSON array with a syntax error stops at that error; a bad JSONL line costs only that line.
    Raises DatasetInvalid when the dataset cannot be resolved at all (dataset_info.json problems).
    """
    path = Path(path)
    if path.name == DATASET_INFO and path.is_file():
        path = path.parent
    errors: list[DataError] = []
    if path.is_dir():
        if dataset is None:
            info, _ = read_dataset_info(path)
            names = ", ".join(sorted(info)) or "none"
            raise DatasetInvalid([DataError(str(path / DATASET_INFO), 1, 1,
                                            f"pass a dataset name (registered: {names})")])
        files, found = resolve_dataset(path, dataset)
        mapping = _as_mapping(mapping) or found
        base = Path(media_dir) if media_dir is not None else path
    else:
        if dataset is not None:
            raise ValueError("dataset names are looked up in a dataset directory, not a file")
        files = [path]
        mapping = _as_mapping(mapping)
        base = Path(media_dir) if media_dir is not None else path.parent
    samples: list[Sample] = []
    for f in files:
        samples.extend(_read_file(f, mapping, base, errors))
    return samples, errors


def load_file(path: PathLike, mapping: Union[None, dict, Mapping] = None,
              media_dir: Optional[PathLike] = None) -> list[Sample]:
    """Read one .json/.jsonl file; raises DatasetInvalid on structural errors (not validated)."""
    samples, errors = read_samples(path, mapping=mapping, media_dir=media_dir)
    if errors:
        raise DatasetInvalid(errors)
    return samples


def load_dataset_dir(dataset_dir: PathLike, name: str) -> list[Sample]:
    """Read dataset ``name`` as registered in dataset_dir/dataset_info.json (not validated)."""
    samples, errors = read_samples(dataset_dir, dataset=name)
    if errors:
        raise DatasetInvalid(errors)
    return samples


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_roles(sample: Sample) -> Optional[DataError]:
    msgs = sample.messages
    if not msgs:
        return sample.error("no messages")
    k = 1 if msgs[0]["role"] == SYSTEM else 0
    if k == len(msgs):
        return sample._message_error(0, "only a system message: a user turn and an assistant answer are needed")
    for n, m in enumerate(msgs[k:]):
        index = k + n
        expected = (USER, OBSERVATION) if n % 2 == 0 else (ASSISTANT, FUNCTION)
        if m["role"] not in expected:
            want = "user" if n % 2 == 0 else "assistant"
            where = " (system is allowed only first)" if m["role"] == SYSTEM else ""
            return sample._message_error(
                index, f"roles out of order: message {index} is {m['role']!r} where {want!r} was expected"
                       f"{where}; order is [system], user, assistant, user, assistant, ...")
    if msgs[-1]["role"] not in (ASSISTANT, FUNCTION):
        return sample._message_error(len(msgs) - 1,
                                     f"roles out of order: the last message is {msgs[-1]['role']!r}, "
                                     "a conversation must end with an assistant answer")
    return None


def _image_problem(path: Path, cache: dict, digests: Optional[dict] = None) -> Optional[str]:
    """Why the image at ``path`` cannot be used (None if it can), memoised in ``cache``; with
    ``digests`` also its dataset_sha256, from the bytes already read (the run's digest then reads no
    image a second time)."""
    key = str(path)
    if key in cache:
        return cache[key]
    problem = None
    if not path.is_file():
        problem = f"image not found: {path}"
    else:
        import cv2
        import numpy as np

        try:
            data = np.fromfile(str(path), dtype=np.uint8)
            img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        except (OSError, cv2.error):
            data, img = None, None
        if img is None:
            problem = f"image cannot be decoded (cv2.imread returned None): {path}"
        elif digests is not None:
            digests[key] = _file_sha256(path.name, memoryview(data))
    cache[key] = problem
    return problem


def _image_problems(paths: list[Path]) -> tuple[list[Optional[str]], dict]:
    cache: dict = {}
    digests: dict = {}
    return [_image_problem(p, cache, digests) for p in paths], digests


def _fork_workers(items: int, chunk: int) -> int:
    """Worker processes for ``items`` in chunks of ``chunk``: a core left for this one, at most 16;
    fewer than 2 means the work is done here."""
    return min(16, (os.cpu_count() or 1) - 1, items // chunk)


def _check_images_in_parallel(paths: list[Path], cache: dict, digests: Optional[dict] = None,
                              chunk: int = 512) -> None:
    """Fill ``cache`` and ``digests`` (as _image_problem would) for many images with worker
    processes: decoding every image of a 100k-sample dataset takes minutes on one core."""
    distinct = list(dict.fromkeys(str(p) for p in paths))
    workers = _fork_workers(len(distinct), chunk)
    if workers < 2:
        return
    import multiprocessing

    parts = [[Path(p) for p in distinct[i:i + chunk]] for i in range(0, len(distinct), chunk)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for part, (problems, part_digests) in zip(parts, pool.imap(_image_problems, parts)):
            cache.update((str(p), problem) for p, problem in zip(part, problems))
            if digests is not None:
                digests.update(part_digests)


# What forked parsing workers inherit (a vocabulary's pydantic models do not pickle); one parse at a time
_PARSING: dict = {}
_PARSING_LOCK = threading.Lock()


def _parses_chunk(texts: list[str]) -> list[bool]:
    from training.answer_kinds import parses_as_actions

    return [parses_as_actions(text, _PARSING["vocab"]) for text in texts]


def _parse_in_parallel(texts: list[str], vocab, chunk: int = 2048) -> list[bool]:
    """parses_as_actions of every text, by forked worker processes for many: on one core the action
    parser reads ~7,000 answers a second, half a minute of a 200k-sample dataset."""
    from training.answer_kinds import parses_as_actions

    workers = _fork_workers(len(texts), chunk)
    if workers < 2:
        return [parses_as_actions(text, vocab) for text in texts]
    import multiprocessing

    with _PARSING_LOCK:
        _PARSING["vocab"] = vocab
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_parses_chunk, [texts[i:i + chunk] for i in range(0, len(texts), chunk)])
        finally:
            _PARSING.clear()
    return [flag for part in parts for flag in part]


_PARSER_REJECTED = "answer rejected by the action parser"


def validate_sample(sample: Sample, vocab=None, check_images: bool = True,
                    image_cache: Optional[dict] = None, image_digests: Optional[dict] = None) -> list[DataError]:
    """Every problem of one sample (see validate); ``image_cache`` shares image checks between
    calls, ``image_digests`` collects the checked images' dataset_sha256."""
    errors: list[DataError] = []
    role_error = _check_roles(sample)
    if role_error is not None:
        errors.append(role_error)
    tags = sum(m["content"].count(IMAGE_TAG) for m in sample.messages)
    if tags != len(sample.images):
        mapping = sample._where.mapping if sample._where is not None else None
        hint = ""
        path: tuple = ()
        if mapping is not None:
            if mapping.images:
                path = (mapping.images,)
            else:
                hint = " (the dataset's mapping has no images column: add columns.images to dataset_info.json)"
        errors.append(sample.error(
            f"{tags} {IMAGE_TAG} tag{'s' if tags != 1 else ''} in the messages but "
            f"{len(sample.images)} image{'s' if len(sample.images) != 1 else ''}{hint}", path))
    for index, m in enumerate(sample.messages):
        if m["role"] == ASSISTANT and not m["content"].strip():
            errors.append(sample._message_error(index, f"empty assistant answer (message {index})", content=True))
        for tag in MEDIA_TAGS:
            if tag in m["content"]:
                errors.append(sample._message_error(
                    index, f"{tag} tag: {tag[1:-1]} is not supported, the node serves single camera frames", content=True))
    if check_images:
        cache = image_cache if image_cache is not None else {}
        for j, p in enumerate(sample.images):
            problem = _image_problem(p, cache, image_digests)
            if problem:
                errors.append(sample._image_error(j, problem))
    if vocab is not None:
        from vla_node.parser import ParseError, parse_actions

        for index, m in enumerate(sample.messages):
            if m["role"] != ASSISTANT or not m["content"].strip():
                continue
            try:
                parse_actions(m["content"], vocab)
            except ParseError as e:
                reason = getattr(e, "reason", None) or str(e)
                errors.append(sample._message_error(index, f"{_PARSER_REJECTED}: {reason}", content=True))
            except ValueError as e:  # ActionError and pydantic errors, should the parser let one through
                errors.append(sample._message_error(index, f"{_PARSER_REJECTED}: {e}", content=True))
    return errors


def validate(samples: Iterable[Sample], vocab=None, check_images: bool = True,
             limit: Optional[int] = None) -> list[DataError]:
    """Check samples before training; returns every problem as a DataError (file:line:col).

    Checks: ``<image>`` tags == images, images exist and decode (``check_images``), role order
    (optional system first, then user/assistant alternating, ending with assistant), non-empty
    answers, and with ``vocab`` (a vla_node Vocabulary) that every answer passes
    vla_node.parser.parse_actions. ``limit`` stops after that many errors.
    """
    errors: list[DataError] = []
    cache: dict = {}
    for sample in samples:
        errors.extend(validate_sample(sample, vocab, check_images, cache))
        if limit is not None and len(errors) >= limit:
            return errors[:limit]
    return errors


def _declared_kind(samples: Sequence[Sample]) -> Optional[str]:
    for s in samples:
        if s._where is not None:
            return s._where.mapping.answers
    return None


def load_validated(path: PathLike, dataset: Optional[str] = None, *, mapping: Union[None, dict, Mapping] = None,
                   media_dir: Optional[PathLike] = None, vocab=None, check_images: bool = True,
                   skip_invalid: bool = False, max_listed: int = 20, answers: Optional[str] = None) -> SampleList:
    """Read + validate. Raises DatasetInvalid on any error, or with ``skip_invalid`` drops the
    invalid samples (count in ``.dropped``, errors in ``.errors``, a warning is logged).

    With ``vocab`` the dataset's answers are classified (training.answer_kinds: ``answers`` or the
    dataset_info.json declaration, else its content) and only an action dataset's answers must
    parse as actions; each sample's ``answer_kind`` and the list's ``verdict`` say which it is.
    Even with ``skip_invalid``, a dataset whose JSON array cannot be parsed to its end, or that ends
    up with no valid sample, raises: what was lost cannot be counted.
    """
    from training.answer_kinds import classify

    samples, read_errors = read_samples(path, dataset=dataset, mapping=mapping, media_dir=media_dir)
    verdict = None
    if vocab is not None:
        try:
            verdict = classify((a for s in samples for a in s.answers), vocab, answers or _declared_kind(samples),
                               parse_all=_parse_in_parallel)
        except ValueError as e:
            where = str(Path(path) / DATASET_INFO) if Path(path).is_dir() else str(path)
            raise DatasetInvalid([DataError(where, 1, 1, f"dataset {dataset!r}: {e}")]) from None
        for s in samples:
            s.answer_kind = verdict.kind
    check_vocab = vocab if verdict is not None and verdict.answers_need_checking else None
    hint = verdict.typo_hint if verdict is not None else ""
    all_errors = list(read_errors)
    kept: list[Sample] = []
    cache: dict = {}
    digests: dict = {}
    if check_images:
        _check_images_in_parallel([p for s in samples for p in s.images], cache, digests)
    for s in samples:
        errs = validate_sample(s, check_vocab, check_images, cache, digests)
        if hint:
            errs = [replace(e, message=e.message + hint) if e.message.startswith(_PARSER_REJECTED) else e
                    for e in errs]
        if errs:
            all_errors.extend(errs)
        else:
            kept.append(s)
    if not all_errors:
        return SampleList(kept, verdict=verdict, image_sha256=digests)
    fatal = [e for e in read_errors if e.fatal]
    if not skip_invalid or fatal or not kept:
        raise DatasetInvalid(all_errors, max_listed=max_listed)
    dropped = len(samples) - len(kept) + len(read_errors)
    log.warning("dropped %d invalid sample(s) of %d (first: %s)", dropped, dropped + len(kept), all_errors[0])
    return SampleList(kept, dropped=dropped, errors=all_errors, verdict=verdict, image_sha256=digests)


# --------------------------------------------------------------------------------------------
# Hashing and writing
# --------------------------------------------------------------------------------------------


def dataset_sha256(path_or_dir: PathLike) -> str:
    """sha256 of a dataset file, or of a whole directory (relative paths + bytes of every
    non-hidden file, sorted, so images count too). Recorded in adapter manifests."""
    root = Path(path_or_dir)
    h = hashlib.sha256()
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith("."):
                    p = Path(dirpath) / name
                    files.append((p.relative_to(root).as_posix(), p))
        files.sort()
    else:
        raise FileNotFoundError(str(root))
    for rel, p in files:
        _hash_entry(h, rel, p.stat().st_size)
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_entry(h, rel: str, size: int) -> None:
    h.update(rel.encode("utf-8") + b"\0" + str(size).encode() + b"\0")


def _file_sha256(name: str, data: Union[bytes, memoryview]) -> str:
    """dataset_sha256 of a file named ``name`` holding ``data``, from bytes in memory."""
    h = hashlib.sha256()
    _hash_entry(h, name, len(data))
    h.update(data)
    return h.hexdigest()
