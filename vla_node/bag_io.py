"""rosbag2 input and output for vla-replay, on the `rosbags` library (no rclpy here).

Input: a bag as `ros2 bag record` writes it (a directory with metadata.yaml and .mcap or
.db3 files, or one such file) holding a camera topic (sensor_msgs/msg/Image or
CompressedImage) and a speech topic (std_msgs/msg/String). `inspect_bag` checks everything
before a node is started (topics, types, every message of the two topics decodes), so a bad
bag fails early with a message that names the file, topic and type.

Output: an mcap (or sqlite3) bag of the node's plans and statuses, with the package's own
message definitions (msg/*.msg) registered so other tools can decode them.
"""
from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_msg

CAMERA_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
SPEECH_TYPE = "std_msgs/msg/String"
PLAN_TYPE = "vla_node/msg/ActionPlan"
STATUS_TYPE = "vla_node/msg/CommandStatus"
PACKAGE_MESSAGES = ("StageLatency", "ActionStep", "ActionPlan", "CommandStatus")  # dependencies first
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class BagError(Exception):
    """The bag cannot be replayed; the message names the file, topic or type (exit code 2)."""


# ---------------------------------------------------------------------------------------- types
def _store_enum():
    """Kilted's type store, or the newest ROS 2 one this rosbags version knows."""
    for name in ("ROS2_KILTED", "ROS2_JAZZY", "LATEST"):
        if hasattr(Stores, name):
            return getattr(Stores, name)
    raise BagError("this rosbags version has no ROS 2 type store")


def msg_dir() -> Path:
    """The package's msg/ directory (source tree or installed share dir)."""
    from vla_node.factory import package_data_dir

    directory = package_data_dir("msg")
    if directory is None or not (directory / "ActionPlan.msg").is_file():
        raise BagError(f"cannot find the package's msg/*.msg files (looked in {directory}); "
                       "run `bash scripts/setup.sh` or install the package")
    return directory


def package_typestore():
    """A ROS 2 type store with vla_node/msg/* registered from msg/*.msg."""
    store = get_typestore(_store_enum())
    directory = msg_dir()
    types: dict[str, Any] = {}
    for name in PACKAGE_MESSAGES:
        path = directory / f"{name}.msg"
        types.update(get_types_from_msg(path.read_text(encoding="utf-8"), f"vla_node/msg/{name}"))
    store.register(types)
    return store


# ---------------------------------------------------------------------------------------- input
@dataclass
class Command:
    """One speech message of the input bag."""

    index: int
    log_ns: int  # bag (receive) time
    text: str


@dataclass
class BagInfo:
    path: Path  # what the user gave
    storage: str  # "mcap" | "sqlite3"
    camera_topic: str
    camera_type: str
    speech_topic: str
    start_ns: int  # first message of the two topics
    end_ns: int
    camera_count: int
    commands: list[Command] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def compressed(self) -> bool:
        return self.camera_type.endswith("CompressedImage")

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _storage_of(path: Path) -> str:
    files = [path] if path.is_file() else list(path.iterdir())
    suffixes = {f.suffix for f in files}
    if ".mcap" in suffixes:
        return "mcap"
    if ".db3" in suffixes:
        return "sqlite3"
    return "unknown"


def _open_reader(path: Path) -> Reader:
    if not path.exists():
        raise BagError(f"{path}: no such bag (give the bag directory that `ros2 bag record` wrote)")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path}: not a rosbag2 bag: the directory has no metadata.yaml")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as error:  # rosbags raises ReaderError, sqlite3/mcap/yaml errors, OSError ...
        raise BagError(f"{_describe(path)}: cannot read the bag: {type(error).__name__}: {error}") from None
    return reader


def _describe(path: Path) -> str:
    """The bag and, for a directory, its storage files: the error then names the broken file."""
    if path.is_dir():
        files = sorted(f.name for f in path.iterdir() if f.suffix in (".mcap", ".db3"))
        if files:
            return f"{path} ({', '.join(files)})"
    return str(path)


def _topic_listing(reader: Reader) -> str:
    topics = sorted({(c.topic, c.msgtype) for c in reader.connections})
    return ", ".join(f"{t} [{m}]" for t, m in topics) or "no topics at all"


def _pick_topic(reader: Reader, path: Path, wanted: str | None, types: tuple[str, ...], role: str,
                flag: str) -> tuple[str, str]:
    by_topic: dict[str, set[str]] = {}
    for connection in reader.connections:
        by_topic.setdefault(connection.topic, set()).add(connection.msgtype)
    expected = " or ".join(types)
    if wanted is not None:
        if wanted not in by_topic:
            raise BagError(f"{path}: the bag has no topic {wanted} ({flag}); it has: {_topic_listing(reader)}")
        msgtypes = by_topic[wanted]
        if len(msgtypes) != 1 or next(iter(msgtypes)) not in types:
            raise BagError(f"{path}: topic {wanted} has message type {', '.join(sorted(msgtypes))}, which "
                           f"vla-replay cannot use as the {role} (expected {expected})")
        return wanted, next(iter(msgtypes))
    candidates = sorted(t for t, m in by_topic.items() if len(m) == 1 and next(iter(m)) in types)
    if not candidates:
        raise BagError(f"{path}: no {role} topic ({expected}) in the bag; it has: {_topic_listing(reader)}")
    if len(candidates) > 1:
        raise BagError(f"{path}: several {role} topics ({', '.join(candidates)}); choose one with {flag}")
    return candidates[0], next(iter(by_topic[candidates[0]]))


def inspect_bag(path: str | Path, camera_topic: str | None = None, speech_topic: str | None = None,
                typestore=None) -> BagInfo:
    """Check the bag completely (every camera and speech message decodes) and list its commands."""
    path = Path(path)
    store = typestore or package_typestore()
    reader = _open_reader(path)
    try:
        camera, camera_type = _pick_topic(reader, path, camera_topic, CAMERA_TYPES, "camera", "--camera-topic")
        speech, _ = _pick_topic(reader, path, speech_topic, (SPEECH_TYPE,), "speech", "--speech-topic")
        info = BagInfo(path=path, storage=_storage_of(path), camera_topic=camera, camera_type=camera_type,
                       speech_topic=speech, start_ns=0, end_ns=0, camera_count=0)
        first = last = None
        for topic, msgtype, log_ns, raw in _iter_raw(reader, path, (camera, speech)):
            message = decode(store, raw, msgtype, path, topic, log_ns)
            first = log_ns if first is None else min(first, log_ns)
            last = log_ns if last is None else max(last, log_ns)
            if topic == speech:
                info.commands.append(Command(len(info.commands), log_ns, message.data))
            else:
                info.camera_count += 1
    finally:
        reader.close()
    if not info.commands:
        raise BagError(f"{path}: topic {speech} has no messages: nothing to replay")
    info.start_ns, info.end_ns = first, last
    return info


def _iter_raw(reader: Reader, path: Path, topics: tuple[str, ...]) -> Iterator[tuple[str, str, int, bytes]]:
    connections = [c for c in reader.connections if c.topic in topics]
    iterator = reader.messages(connections=connections)
    while True:
        try:
            connection, log_ns, raw = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            raise BagError(f"{_describe(path)}: the bag is corrupt or truncated while reading {', '.join(topics)}: "
                           f"{type(error).__name__}: {error}") from None
        yield connection.topic, connection.msgtype, log_ns, raw


def decode(store, raw: bytes, msgtype: str, path: Path | str = "", topic: str = "", log_ns: int = 0) -> Any:
    try:
        return store.deserialize_cdr(raw, msgtype)
    except Exception as error:
        raise BagError(f"{path}: a {msgtype} message on {topic} at t={log_ns} ns does not decode: "
                       f"{type(error).__name__}: {error}") from None


def iter_messages(info: BagInfo) -> Iterator[tuple[str, int, bytes]]:
    """(topic, log_ns, serialized CDR) of the camera and speech topics, in bag time order."""
    reader = _open_reader(info.path)
    try:
        for topic, _, log_ns, raw in _iter_raw(reader, info.path, (info.camera_topic, info.speech_topic)):
            yield topic, log_ns, raw
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------- output
class OutputBag:
    """Collects serialized messages (as received from rclpy, any thread) and writes them, with
    full message definitions, on close() in the calling thread (sqlite3 connections are bound
    to the thread that opened them)."""

    def __init__(self, path: str | Path, storage: str = "mcap", typestore=None):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.path = Path(path)
        self.storage = storage
        self.store = typestore or package_typestore()
        self._topics: dict[str, tuple[str, list]] = {}
        self._messages: list[tuple[str, int, bytes]] = []
        self._lock = threading.Lock()
        self.closed = False

    def add_topic(self, topic: str, msgtype: str, qos: list | None = None) -> None:
        self._topics[topic] = (msgtype, list(qos or ()))

    def write(self, topic: str, log_ns: int, raw: bytes) -> None:
        if topic not in self._topics:
            raise KeyError(f"topic {topic} was not added to the output bag")
        with self._lock:
            if not self.closed:
                self._messages.append((topic, log_ns, bytes(raw)))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            messages = sorted(self._messages, key=lambda m: m[1])
        writer = Writer(self.path, version=9, storage_plugin=STORAGES[self.storage])
        writer.open()
        try:
            connections = {topic: writer.add_connection(topic, msgtype, typestore=self.store,
                                                        offered_qos_profiles=qos)
                           for topic, (msgtype, qos) in self._topics.items()}
            for topic, log_ns, raw in messages:
                writer.write(connections[topic], log_ns, raw)
        finally:
            writer.close()


def write_bag(path: str | Path, messages: list[tuple[str, str, int, Any]], storage: str = "mcap",
              typestore=None, qos: dict[str, list] | None = None) -> Path:
    """Write (topic, msgtype, log_ns, message object of the typestore) tuples as a new bag."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    bag = OutputBag(path, storage, typestore)
    try:
        for topic, msgtype in dict.fromkeys((t, m) for t, m, _, _ in messages):
            bag.add_topic(topic, msgtype, (qos or {}).get(topic))
        for topic, msgtype, log_ns, message in sorted(messages, key=lambda m: m[2]):
            bag.write(topic, log_ns, bag.store.serialize_cdr(message, msgtype))
    finally:
        bag.close()
    return path


def read_messages(path: str | Path, topics: tuple[str, ...] | None = None,
                  typestore=None) -> list[tuple[str, int, Any]]:
    """(topic, log_ns, decoded message) of every message (or those of `topics`), in time order."""
    store = typestore or package_typestore()
    reader = _open_reader(Path(path))
    try:
        names = topics or tuple({c.topic for c in reader.connections})
        return [(topic, log_ns, decode(store, raw, msgtype, path, topic, log_ns))
                for topic, msgtype, log_ns, raw in _iter_raw(reader, Path(path), names)]
    finally:
        reader.close()
