"""vla-replay: golden bags through the real node, expectations and diffs, output bag, dataset export,
bad input, and the demo.

Replays run the REAL node in-process (own rclpy context, random free domain, localhost only).
Golden expectations pin what the embedded model (models/tabletop-tiny + zh LoRA) answers; the
model-independent cases use a tiny random checkpoint (tests/fixtures_models.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed (run `make setup`)")
pytest.importorskip("rosbags", reason="rosbags is not installed (run `make setup`)")

from tests.fixtures_models import tiny_checkpoints, tiny_model_dir, tiny_qwen2_5_vl  # noqa: E402,F401
from vla_node import replay  # noqa: E402
from vla_node.bag_io import OutputBag, package_typestore, read_messages, write_bag  # noqa: E402
from vla_node.report import compare, load_expectations  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
EMBEDDED = REPO / "models" / "tabletop-tiny"
EMBEDDED_ZH = REPO / "models" / "tabletop-tiny-zh-lora"
GOLDEN = [("golden_mcap", "mcap"), ("golden_sqlite3", "sqlite3")]
MODEL_INDEPENDENT = {"NO_IMAGE", "STALE_IMAGE", "BUSY", "STOPPED", "CANCELLED"}


def embedded_model_ready() -> bool:
    return (EMBEDDED / "config.json").is_file() and (EMBEDDED_ZH / "adapter_config.json").is_file()


def needs_embedded():
    if not embedded_model_ready():
        pytest.skip("the embedded model is not built (models/tabletop-tiny + models/tabletop-tiny-zh-lora): "
                    "make models")


def model_args(expect: dict, request) -> list[str]:
    """Golden expectations record their node parameters (embedded model); development ones need a model."""
    if expect.get("node_parameters"):
        if not expect["node_parameters"].get("model_path"):
            needs_embedded()
        return []
    return ["--model", str(request.getfixturevalue("tiny_model_dir"))]


def no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), "a partial output directory was left behind"


# ------------------------------------------------------------------------------------- bags
def _image(store, t_ns: int, rng: np.random.Generator, width: int = 160, height: int = 120):
    Image, Header, Time = (store.types[n] for n in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                    "builtin_interfaces/msg/Time"))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    header = Header(stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id="camera")
    return Image(header=header, height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3,
                 data=pixels.reshape(-1))


MINI_COMMANDS = [  # (t, text, status that does not depend on the model)
    (0.0, "pick up the red cube", "NO_IMAGE"),
    (0.5, "stop", "STOPPED"),
    (0.7, "停下", "STOPPED"),
    (3.2, "put the red cube in the blue bowl", "STALE_IMAGE"),  # 2.9 s after the only frame
]


def write_mini_bag(path: Path, storage: str = "mcap") -> Path:
    store = package_typestore()
    base = 1_700_000_000 * 10**9
    String = store.types["std_msgs/msg/String"]
    messages = [("/camera/image_raw", "sensor_msgs/msg/Image", base + 300_000_000,
                 _image(store, base + 300_000_000, np.random.default_rng(0)))]
    messages += [("/speech/text", "std_msgs/msg/String", base + int(t * 1e9), String(data=text))
                 for t, text, _ in MINI_COMMANDS]
    return write_bag(path, messages, storage=storage, typestore=store)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, tiny_model_dir):
    """One replay of a small bag (model-independent statuses only) with --write-expect."""
    root = tmp_path_factory.mktemp("mini")
    bag = write_mini_bag(root / "mini_bag")
    expect = root / "mini.expect.json"
    rc = replay.main([str(bag), "--model", str(tiny_model_dir), "--out", str(root / "out"),
                      "--write-expect", str(expect), "-q"])
    return {"rc": rc, "bag": bag, "expect": expect, "out": root / "out", "root": root}


# ------------------------------------------------------------------------------------- CLI
def test_help_is_truthful(capsys):
    with pytest.raises(SystemExit) as exit_info:
        replay.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--rate", "--as-fast-as-possible", "--keep-stamps", "--external", "--expect", "--write-expect",
                 "--export-dataset", "--corrections", "--out", "mcap", "sqlite3", "exit status", "FIFO",
                 "max_image_age_s"):
        assert word in text
    parser = replay.build_arg_parser()
    assert parser.parse_args(["b"]).rate == 1.0 and parser.parse_args(["b"]).out_storage == "mcap"


def test_node_parameters_are_typed_like_the_node_declares_them():
    assert replay.parse_node_parameter("max_image_age_s:=3") == ("max_image_age_s", 3.0)
    assert replay.parse_node_parameter("warmup:=false") == ("warmup", False)
    assert replay.parse_node_parameter('adapters:=["zh=embedded"]') == ("adapters", ["zh=embedded"])
    assert replay.parse_node_parameter("queue_size:=2") == ("queue_size", 2)
    with pytest.raises(replay.ReplayError, match="no_such_parameter"):
        replay.parse_node_parameter("no_such_parameter:=1")
    with pytest.raises(replay.ReplayError, match="queue_size"):
        replay.parse_node_parameter("queue_size:=many")


def test_statuses_match_sent_commands_by_text_in_fifo_order():
    from vla_node.actions import CommandStatus, StatusCode
    from vla_node.report import CommandResult

    results = [CommandResult(i, text, 0.0) for i, text in enumerate(["go", "  put  it\tthere ", "go"])]
    tracker = replay.Tracker(results)
    for result in results:
        tracker.sent(result)
    tracker.on_status(CommandStatus(command_id="c2", command_text="put it there", code=StatusCode.BUSY), 1)
    tracker.on_status(CommandStatus(command_id="c1", command_text="go", code=StatusCode.NO_IMAGE), 2)
    tracker.on_status(CommandStatus(command_id="c3", command_text="go", code=StatusCode.STOPPED), 3)
    tracker.on_status(CommandStatus(command_id="x", command_text="someone else's", code=StatusCode.BUSY), 4)
    assert [r.code for r in results] == ["NO_IMAGE", "BUSY", "STOPPED"]
    assert [r.status.command_id for r in results] == ["c1", "c2", "c3"]
    assert tracker.all_answered() and len(tracker.unmatched) == 1


def test_compare_tolerates_boxes_within_iou_and_shows_the_rest():
    steps = [{"verb": "PICK_OBJECT", "object": "red cube", "destination": "", "reason": "",
              "object_box": [10, 10, 50, 50]}]
    expect = {"commands": [{"text": "a", "status": "ACCEPTED", "steps": steps},
                           {"text": "b", "status": None}], "min_iou": 0.5}
    near = dict(steps[0], object_box=[12, 11, 52, 50])
    report = {"commands": [{"text": "a", "status": "ACCEPTED", "actions": [near]},
                           {"text": "b", "status": "PARSE_ERROR", "actions": []}]}
    assert compare(expect, report) == []
    far = dict(steps[0], object_box=[40, 40, 90, 90], object="blue cube")
    report["commands"][0]["actions"] = [far]
    diff = "\n".join(compare(expect, report))
    assert '-    PICK_OBJECT object="red cube" object_box=[10, 10, 50, 50]' in diff
    assert '+    PICK_OBJECT object="blue cube" object_box=[40, 40, 90, 90] (IoU 0.03 < 0.5)' in diff
    assert "PARSE_ERROR" not in diff  # status null: not compared


# ------------------------------------------------------------------------------------- golden bags
@pytest.mark.parametrize("name,storage", GOLDEN)
def test_golden_bag_replays_as_expected(name, storage, tmp_path, request, capsys):
    """Covers both storages; the output bag decodes with rosbags from its own message definitions."""
    bag = DATA / name
    assert (bag / "metadata.yaml").is_file(), "run python tests/data/make_golden.py"
    assert any(f.suffix == (".mcap" if storage == "mcap" else ".db3") for f in bag.iterdir())
    expect_path = DATA / f"{name}.expect.json"
    expect = load_expectations(expect_path)
    pinned = {c["status"] for c in expect["commands"]} & MODEL_INDEPENDENT
    assert pinned, "the golden bag should pin model-independent statuses"
    out = tmp_path / "out"
    dataset = tmp_path / "dataset"
    argv = [str(bag), "--expect", str(expect_path), "--out", str(out), "--export-dataset", str(dataset)]
    rc = replay.main(argv + model_args(expect, request))
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["storage"] == storage and report["summary"]["commands"] == len(expect["commands"])
    assert (out / "report.md").read_text(encoding="utf-8").count("\n| ") == len(expect["commands"]) + 1

    # the output bag is self-describing: decode it with an EMPTY type store
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    with AnyReader([out / "output_bag"], default_typestore=get_typestore(Stores.EMPTY)) as reader:
        decoded = [(c.msgtype, reader.deserialize(raw, c.msgtype)) for c, _, raw in reader.messages()]
    statuses = [m for t, m in decoded if t == "vla_node/msg/CommandStatus"]
    plans = [m for t, m in decoded if t == "vla_node/msg/ActionPlan"]
    assert sorted(s.code_name for s in statuses) == sorted(c["status"] for c in report["commands"])
    assert any(p.steps and p.steps[0].verb == "STOP" for p in plans)
    accepted = [c for c in report["commands"] if c["status"] in ("ACCEPTED", "STOPPED")]
    assert len(plans) == len(accepted)

    # accepted plans became a dataset the data checker accepts (frames as PNG)
    info = json.loads((dataset / "dataset_info.json").read_text(encoding="utf-8"))
    samples = json.loads((dataset / f"{next(iter(info))}.json").read_text(encoding="utf-8"))
    exported = [c for c in report["commands"] if c["status"] == "ACCEPTED" and c["frame"]]
    assert len(samples) == len(exported)
    for sample in samples:
        assert (dataset / sample["images"][0]).is_file() and sample["images"][0].endswith(".png")


def test_altered_expectation_fails_with_a_readable_diff(mini_run, tmp_path, capsys):
    assert mini_run["rc"] == 0
    expect = json.loads(mini_run["expect"].read_text(encoding="utf-8"))
    assert [c["status"] for c in expect["commands"]] == [s for _, _, s in MINI_COMMANDS]
    assert expect["commands"][1]["steps"][0]["verb"] == "STOP"
    report = json.loads((mini_run["out"] / "report.json").read_text(encoding="utf-8"))
    assert compare(expect, report) == []

    expect["commands"][0]["status"] = "ACCEPTED"
    expect["commands"][2]["steps"][0]["verb"] = "CLARIFY"
    altered = tmp_path / "altered.expect.json"
    altered.write_text(json.dumps(expect, ensure_ascii=False), encoding="utf-8")
    capsys.readouterr()
    rc = replay.main([str(mini_run["bag"]), "--expect", str(altered), "--out", str(tmp_path / "out"), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"--- {altered}" in out and "+++ " in out
    assert '-#0 "pick up the red cube" -> ACCEPTED' in out
    assert '+#0 "pick up the red cube" -> NO_IMAGE' in out
    assert "-    CLARIFY" in out and "+    STOP" in out
    assert (tmp_path / "out" / "report.json").is_file()  # a complete run keeps its output


def test_as_fast_as_possible_keeps_recorded_staleness(mini_run, tmp_path, tiny_model_dir):
    rc = replay.main([str(mini_run["bag"]), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                      "--as-fast-as-possible", "--expect", str(mini_run["expect"]), "-q"])
    assert rc == 0


def test_sqlite3_output_bag_and_keep_stamps(mini_run, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    rc = replay.main([str(mini_run["bag"]), "--model", str(tiny_model_dir), "--out", str(out),
                      "--out-storage", "sqlite3", "--keep-stamps", "-q"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # recorded stamps are from 2023: the one command with a frame sees it as stale
    assert [c["status"] for c in report["commands"]] == [s for _, _, s in MINI_COMMANDS]
    assert any(f.suffix == ".db3" for f in (out / "output_bag").iterdir())
    messages = read_messages(out / "output_bag")
    assert {type(m).__name__ for _, _, m in messages} == {"vla_node__msg__CommandStatus",
                                                           "vla_node__msg__ActionPlan"}


def test_external_node_on_the_current_domain(mini_run, tmp_path, tiny_model_dir, monkeypatch):
    """--external: a vla_node process started the way launch files start it, on its own domain."""
    import subprocess

    from vla_node.ros.replay_session import pick_free_domain

    domain = pick_free_domain()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    log = tmp_path / "node.log"
    with open(log, "wb") as handle:
        node = subprocess.Popen([sys.executable, "-m", "vla_node.ros.node", "--ros-args", "-p",
                                 f"model_path:={tiny_model_dir}"], stdout=handle, stderr=subprocess.STDOUT)
    try:
        rc = replay.main([str(mini_run["bag"]), "--external", "--startup-timeout", "90", "--out",
                          str(tmp_path / "out"), "--expect", str(mini_run["expect"]), "-q"])
    finally:
        node.terminate()
        node.wait(timeout=30)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["node"]["mode"] == "external" and report["node"]["domain_id"] == domain


# ------------------------------------------------------------------------------------- dataset export
def test_dataset_export_round_trip_with_corrections(mini_run, tmp_path, tiny_model_dir, capsys):
    report = json.loads((mini_run["out"] / "report.json").read_text(encoding="utf-8"))
    report["commands"][0]["corrected_actions"] = 'PICK_OBJECT(object="red cube")'  # no frame: skipped
    report["commands"][1]["corrected_actions"] = ""  # left out
    report["commands"][3]["corrected_actions"] = (
        'MOVE_OBJECT(object="red cube", object_box=[20, 30, 60, 70], destination="blue bowl")')
    corrections = tmp_path / "report.json"
    corrections.write_text(json.dumps(report, ensure_ascii=False), encoding="utf-8")
    dataset = tmp_path / "dataset"
    rc = replay.main([str(mini_run["bag"]), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                      "--export-dataset", str(dataset), "--corrections", str(corrections)])
    assert rc == 0, capsys.readouterr().err
    samples = json.loads((dataset / "vla_replay.json").read_text(encoding="utf-8"))
    # index 2 ("停下", STOPPED) is no ACCEPTED plan and has no correction: not exported
    assert len(samples) == 1
    messages = samples[0]["messages"]
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    expected = PromptBuilder(Vocabulary.load()).sharegpt_messages("put the red cube in the blue bowl",
                                                                  messages[2]["content"])
    assert messages == expected
    assert messages[2]["content"].startswith('MOVE_OBJECT(object="red cube", object_box=[')
    assert (dataset / samples[0]["images"][0]).is_file()

    from training.data_cli import main as data_cli

    assert data_cli(["check", str(dataset), "--actions"]) == 0

    if not (REPO / "training" / "train.py").is_file():
        pytest.skip("training/train.py is absent: the training half of the round trip cannot run")
    from training.config import load_config
    from training.train import train

    result = train(load_config(None, [
        f"model_path={tiny_model_dir}", f"dataset_dir={dataset}", "dataset=vla_replay",
        f"output_dir={tmp_path / 'adapter'}", "max_steps=2", "per_device_train_batch_size=1",
        "learning_rate=1e-3", "warmup_ratio=0.0", "logging_steps=1", "save_steps=100", "report_to=none",
        "disable_tqdm=True", "seed=0"]))
    assert result.global_step == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_corrections_from_another_bag_are_refused(mini_run, tmp_path, tiny_model_dir, capsys):
    report = json.loads((mini_run["out"] / "report.json").read_text(encoding="utf-8"))
    report["commands"][3]["text"] = "something else"
    report["commands"][3]["corrected_actions"] = "STOP()"
    corrections = tmp_path / "report.json"
    corrections.write_text(json.dumps(report), encoding="utf-8")
    rc = replay.main([str(mini_run["bag"]), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                      "--export-dataset", str(tmp_path / "dataset"), "--corrections", str(corrections), "-q"])
    assert rc == 2
    assert str(corrections) in capsys.readouterr().err
    no_leftovers(tmp_path / "out")
    no_leftovers(tmp_path / "dataset")


# ------------------------------------------------------------------------------------- bad input
def _truncated_mcap(root: Path) -> Path:
    bag = write_mini_bag(root / "truncated")
    data = next(bag.glob("*.mcap"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return bag


def _garbage_sqlite(root: Path) -> Path:
    bag = write_mini_bag(root / "garbage", storage="sqlite3")
    next(bag.glob("*.db3")).write_bytes(b"not a database " * 100)
    return bag


def _no_speech(root: Path) -> Path:
    store = package_typestore()
    return write_bag(root / "no_speech", [("/camera/image_raw", "sensor_msgs/msg/Image", 10**9,
                                           _image(store, 10**9, np.random.default_rng(1)))], typestore=store)


def _unknown_type(root: Path) -> Path:
    from rosbags.typesys import get_types_from_msg

    store = package_typestore()
    store.register(get_types_from_msg("uint32 width\nuint8[] pixels", "acme_msgs/msg/RawFrame"))
    Frame, String = store.types["acme_msgs/msg/RawFrame"], store.types["std_msgs/msg/String"]
    return write_bag(root / "unknown_type", [
        ("/cam", "acme_msgs/msg/RawFrame", 10**9, Frame(width=1, pixels=np.zeros(3, np.uint8))),
        ("/speech/text", "std_msgs/msg/String", 2 * 10**9, String(data="pick up the red cube"))], typestore=store)


def _corrupt_message(root: Path) -> Path:
    path = root / "corrupt_message"
    bag = OutputBag(path, "mcap")
    bag.add_topic("/camera/image_raw", "sensor_msgs/msg/Image")
    bag.add_topic("/speech/text", "std_msgs/msg/String")
    bag.write("/speech/text", 10**9, b"\x00\x01\x00\x00\xff\xff\xff\x7fabc")  # string length 2 GB
    bag.close()
    return path


def _no_metadata(root: Path) -> Path:
    (root / "plain_dir").mkdir()
    (root / "plain_dir" / "notes.txt").write_text("hello")
    return root / "plain_dir"


BAD_BAGS = {
    # name: (make, extra args, words the error must contain)
    "missing": (lambda root: root / "does_not_exist", [], ["does_not_exist", "no such bag"]),
    "no_metadata": (_no_metadata, [], ["plain_dir", "metadata.yaml"]),
    "truncated_mcap": (_truncated_mcap, [], ["truncated", "truncated.mcap", "cannot read"]),
    "garbage_sqlite3": (_garbage_sqlite, [], ["garbage.db3", "cannot read"]),
    "no_speech_topic": (_no_speech, [], ["no_speech", "no speech topic", "std_msgs/msg/String",
                                         "/camera/image_raw [sensor_msgs/msg/Image]"]),
    "unknown_type_auto": (_unknown_type, [], ["unknown_type", "no camera topic", "/cam [acme_msgs/msg/RawFrame]"]),
    "unknown_type_named": (_unknown_type, ["--camera-topic", "/cam"], ["topic /cam", "acme_msgs/msg/RawFrame"]),
    "wrong_topic_name": (lambda root: write_mini_bag(root / "mini"), ["--speech-topic", "/voice"],
                         ["no topic /voice", "--speech-topic", "/speech/text [std_msgs/msg/String]"]),
    "corrupt_message": (_corrupt_message, [], ["corrupt_message", "/speech/text", "std_msgs/msg/String",
                                               "does not decode"]),
    # numbers that would make the replay wait forever or compare nothing
    "nan_status_timeout": (lambda root: write_mini_bag(root / "mini"), ["--status-timeout", "nan"],
                           ["--status-timeout must be a finite number > 0, got nan"]),
    "infinite_rate": (lambda root: write_mini_bag(root / "mini"), ["--rate", "inf"], ["--rate must be a finite"]),
    "zero_startup_timeout": (lambda root: write_mini_bag(root / "mini"), ["--startup-timeout", "0"],
                             ["--startup-timeout must be a finite number > 0, got 0.0"]),
    "min_iou_out_of_range": (lambda root: write_mini_bag(root / "mini"), ["--min-iou", "1.5"],
                             ["--min-iou must be between 0 and 1, got 1.5"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BAGS))
def test_bad_input_exits_2_naming_the_problem(case, tmp_path, capsys):
    make, extra, words = BAD_BAGS[case]
    bag = make(tmp_path)
    out = tmp_path / "out"
    rc = replay.main([str(bag), "--out", str(out), "-q"] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    no_leftovers(out)


def test_bad_expectation_file_and_bad_model_exit_2(mini_run, tmp_path, capsys):
    bad = tmp_path / "bad.expect.json"
    bad.write_text('{"commands": [{"text": "a", "steps": [{"verb": "STOP", "colour": "red"}]}]}')
    rc = replay.main([str(mini_run["bag"]), "--expect", str(bad), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "colour" in err
    rc = replay.main([str(mini_run["bag"]), "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"),
                      "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot start the vla node" in err and "no_model" in err
    no_leftovers(tmp_path / "out")


# ------------------------------------------------------------------------------------- hostile commands
HUGE_COMMAND = "put the red cube in the blue bowl " * 3000  # ~100,000 characters
NUL_LED_COMMAND = "\x00pick up the red cube"  # ROS strings end at NUL: the node receives ""


def _in_thread(target, hang_guard_s: float):
    """target() in a thread; its result, or a failure when it is still running after hang_guard_s."""
    import threading

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(value=target()), daemon=True)
    thread.start()
    thread.join(hang_guard_s)
    assert not thread.is_alive(), f"still running after {hang_guard_s} s"
    return outcome["value"]


def test_the_table_fits_any_text_to_its_column():
    import io

    from vla_node.replay_table import fit
    from vla_node.report import CommandResult

    assert len(HUGE_COMMAND) > 100_000 - 5000
    out = io.StringIO()
    results = [CommandResult(0, HUGE_COMMAND, 0.0), CommandResult(1, NUL_LED_COMMAND + "\n\x1b[2J", 0.0),
               CommandResult(2, "把红色方块放进蓝色碗里" * 10, 0.0)]
    _in_thread(lambda: replay.print_table(results, out=out), hang_guard_s=30)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, "one line per command: control characters are shown escaped, not obeyed"
    assert "\\x00pick up the red cube\\n\\x1b[2J" in lines[3]
    assert "\x1b" not in out.getvalue() and "\x00" not in out.getvalue()
    assert fit("停停停", 5) == "停停…" and fit("ab", 5) == "ab   " and fit("x" * 50, 4) == "xxx…"


def write_hostile_bag(path: Path) -> Path:
    store = package_typestore()
    base = 1_700_000_000 * 10**9
    String = store.types["std_msgs/msg/String"]
    messages = [("/camera/image_raw", "sensor_msgs/msg/Image", base, _image(store, base, np.random.default_rng(1)))]
    messages += [("/speech/text", "std_msgs/msg/String", base + int(t * 1e9), String(data=text))
                 for t, text in ((0.2, HUGE_COMMAND), (0.4, NUL_LED_COMMAND), (0.6, "stop"))]
    return write_bag(path, messages, storage="mcap", typestore=store)


def test_huge_and_nul_led_commands_replay_at_once_with_their_statuses_matched(tmp_path, tiny_model_dir, capsys):
    bag = write_hostile_bag(tmp_path / "hostile_bag")
    out = tmp_path / "out"
    # --status-timeout: a missed match would end as NO_STATUS after 20 s, and exit 1
    rc = _in_thread(lambda: replay.main([str(bag), "--model", str(tiny_model_dir), "--out", str(out),
                                         "--as-fast-as-possible", "--status-timeout", "20"]), hang_guard_s=300)
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [c["status"] for c in report["commands"]] == ["BAD_COMMAND", "BAD_COMMAND", "STOPPED"]
    assert report["commands"][1]["text"] == NUL_LED_COMMAND and "empty" in report["commands"][1]["detail"]
    assert "over the limit" in report["commands"][0]["detail"] or "far over" in report["commands"][0]["detail"]
    assert report["unmatched_statuses"] == []
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "\\x00pick up the red cube" in markdown and len(markdown) < 10_000


# ------------------------------------------------------------------------------------- demo
def test_demo_replays_the_bundled_bag_and_draws_every_command(tmp_path, capsys):
    needs_embedded()
    from vla_node import demo

    rc = demo.main(["--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text(encoding="utf-8"))
    pngs = sorted((tmp_path / "demo").glob("command_*.png"))
    assert len(pngs) == report["summary"]["commands"] >= 4
    assert report["node"]["adapter_id"], "the demo runs with the zh adapter active"
    assert report["summary"]["by_status"].get("ACCEPTED", 0) >= 3
    for command in report["commands"]:  # the table shortens long commands to their column
        assert command["text"][:30] in out
    import cv2

    assert cv2.imread(str(pngs[0])).shape[1] == demo.PANEL_WIDTH
    # the verdicts: one line per command, right or WRONG by the truth file, and the total
    from vla_node.report import command_verdicts

    verdicts = command_verdicts(load_expectations(DATA / "demo_bag.truth.json"), report)
    right = sum(ok for ok, _ in verdicts)
    assert f"{right} of {len(report['commands'])} commands answered as the scene requires" in out
    for command, (ok, _) in zip(report["commands"], verdicts):
        assert f"#{command['index']} {'right' if ok else 'WRONG'}  {command['text']}" in out
    assert out.count("the scene requires:") == len(verdicts) - right


def test_the_demo_truth_is_the_generators_answer_to_each_scene_of_the_bag():
    """Written by make_golden from the generator (never by a model), for this very bag."""
    sys.path.insert(0, str(DATA))
    import make_golden

    scenes = make_golden.Scenes()
    make_golden.golden_mcap(scenes)  # the golden bags draw their scenes first: the demo takes the next ones
    make_golden.golden_sqlite3(scenes)
    expected = make_golden.truth_expectations(make_golden.demo_bag(scenes))
    truth = load_expectations(DATA / "demo_bag.truth.json")
    assert truth == json.loads(json.dumps(expected, ensure_ascii=False))
    spoken = [message.data for topic, _, message in read_messages(DATA / "demo_bag") if topic == "/speech/text"]
    assert spoken == [command["text"] for command in truth["commands"]]
    assert all(command["steps"] for command in truth["commands"])
    named = [step for command in truth["commands"] for step in command["steps"] if step["object"] or step["destination"]]
    assert named and all(("object_box" in step) == bool(step["object"]) and
                         ("destination_box" in step) == bool(step["destination"]) for step in named), \
        "every object and destination the truth names comes with its box"


def test_verdicts_hold_boxes_to_the_iou_tolerance_and_names_exactly():
    from vla_node.report import command_verdicts

    truth = load_expectations(DATA / "demo_bag.truth.json")
    first = truth["commands"][0]
    step = dict(first["steps"][0])

    def report(*steps, status="ACCEPTED"):
        return {"commands": [{"index": 0, "text": first["text"], "status": status, "actions": list(steps)}]}

    shifted = dict(step, object_box=[v + 2 for v in step["object_box"]])  # IoU still well over 0.5
    assert command_verdicts(truth, report(shifted)) == [(True, command_verdicts(truth, report(step))[0][1])]
    x0, y0, x1, y1 = step["object_box"]
    beside = dict(step, object_box=[x1 + 5, y0, x1 + 5 + (x1 - x0), y1])  # same size, on empty table
    (ok, required), = command_verdicts(truth, report(beside))
    assert not ok and any("object_box=[" in line for line in required)
    assert not command_verdicts(truth, report(dict(step, object="yellow cylinder")))[0][0]
    assert not command_verdicts(truth, report(step, status="REJECTED_BY_POLICY"))[0][0]
    assert not command_verdicts(truth, report({k: v for k, v in step.items() if k != "object_box"}))[0][0], \
        "a plan without the box the scene requires is not right"
    extra = {"commands": report(step)["commands"] + [{"index": 1, "text": "more", "status": "ACCEPTED", "actions": []}]}
    assert [ok for ok, _ in command_verdicts({**truth, "commands": truth["commands"][:1]}, extra)] == [True, False]


# Issue 21's demo target is every command right. The model that meets the English plan exact match
# target (models/METRICS.md: 0.955) still answers these demo commands wrongly; a model that gets one
# of them right must take it off this list, so the list only ever shrinks towards the target.
DEMO_COMMANDS_STILL_WRONG: dict[int, str] = {}


def test_the_demo_answers_every_command_as_its_scene_requires_but_the_known_misses(tmp_path, capsys):
    """Each demo command's verdict (labels, and boxes within IoU 0.5 of the truth), from the real demo."""
    needs_embedded()
    from vla_node import demo

    assert demo.main(["--out", str(tmp_path / "demo"), "--as-fast-as-possible"]) == 0
    out = capsys.readouterr().out
    truth = load_expectations(DATA / "demo_bag.truth.json")
    right = len(truth["commands"]) - len(DEMO_COMMANDS_STILL_WRONG)
    assert f"{right} of {len(truth['commands'])} commands answered as the scene requires" in out, out
    for index, command in enumerate(truth["commands"]):
        verdict = "WRONG" if index in DEMO_COMMANDS_STILL_WRONG else "right"
        assert f"#{index} {verdict}  {command['text']}" in out, out
    assert all(truth["commands"][index]["text"] == text for index, text in DEMO_COMMANDS_STILL_WRONG.items())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
