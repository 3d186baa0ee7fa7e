"""training.sharegpt: LLaMA-Factory ShareGPT reading, file:line:col validation, writing."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training import sharegpt as sg  # noqa: E402
from training.data_cli import main as data_main  # noqa: E402
from vla_node.parser import ParseError, parse_actions  # noqa: E402
from vla_node.vocabulary import Vocabulary  # noqa: E402

SYSTEM = "You control a robot arm."
GOOD_ANSWER = 'MOVE_OBJECT(object="red cube", destination="blue bowl")'


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


@pytest.fixture
def ds(tmp_path):
    """A dataset dir with a decodable image, an undecodable one, and helpers to write files."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((12, 16, 3), 128, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    return tmp_path


def msgs(answer=GOOD_ANSWER, command="put the red cube in the blue bowl", system=True):
    out = [{"role": "system", "content": SYSTEM}] if system else []
    return out + [{"role": "user", "content": "<image>Command: " + json.dumps(command)},
                  {"role": "assistant", "content": answer}]


def good(**kw):
    return {"messages": msgs(**kw), "images": ["a.png"]}


def write_array(path: Path, rows) -> Path:
    """One sample per line: sample k (0-based) starts on line k + 2, column 1."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    return path


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def col_of(path: Path, line: int, needle: str) -> int:
    """1-based column of `needle` on `line` of the file."""
    text = path.read_text(encoding="utf-8").split("\n")[line - 1]
    assert needle in text, (needle, text)
    return text.index(needle) + 1


def only_error(errors):
    assert len(errors) == 1, [str(e) for e in errors]
    return str(errors[0])


# ---------------------------------------------------------------------------------------------
# good files of each variant
# ---------------------------------------------------------------------------------------------


def test_messages_json_array(ds):
    f = write_array(ds / "train.json", [good(), good(answer="STOP()", command="stop")])
    samples = sg.load_file(f)
    assert len(samples) == 2
    s = samples[1]
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
    assert s.messages[2]["content"] == "STOP()"
    assert s.images == [ds / "a.png"]
    assert s.source == f"{f}:3"
    assert sg.validate(samples) == []


def test_messages_jsonl(ds):
    f = write_lines(ds / "train.jsonl", [good(), "", good(system=False)])  # a blank line is skipped
    samples, errors = sg.read_samples(f)
    assert errors == [] and len(samples) == 2
    assert samples[1].source == f"{f}:3"
    assert samples[1].messages[0]["role"] == "user"
    assert sg.validate(samples) == []


def test_json_content_that_is_jsonl_is_read(ds):
    f = write_lines(ds / "lines.json", [good(), good()])  # HF datasets reads JSONL inside .json too
    assert len(sg.load_file(f)) == 2


def _conversations(answer=GOOD_ANSWER):
    return {"conversations": [{"from": "human", "value": "<image>put the red cube in the blue bowl"},
                              {"from": "gpt", "value": answer}],
            "system": SYSTEM, "images": ["a.png"]}


def test_conversations_through_dataset_info(ds):
    (ds / "data").mkdir()
    write_array(ds / "data" / "conv.json", [_conversations(), _conversations("STOP()")])
    info = {"robot": {"file_name": "data/conv.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "images": "images", "system": "system"}}}
    (ds / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    samples = sg.load_dataset_dir(ds, "robot")
    assert len(samples) == 2
    # LLaMA-Factory's default tags (from/value, human/gpt) and the system column
    assert samples[0].messages == [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "<image>put the red cube in the blue bowl"},
                                   {"role": "assistant", "content": GOOD_ANSWER}]
    # images are relative to the dataset dir (media_dir), not to data/
    assert samples[0].images == [ds / "a.png"]
    assert sg.validate(samples) == []


def test_custom_tags_and_jsonl_through_dataset_info(ds):
    rows = [{"dialog": [{"speaker": "U", "text": "<image>pick up the red cube"},
                        {"speaker": "A", "text": 'PICK_OBJECT(object="red cube")'}], "pics": ["a.png"]}]
    write_lines(ds / "custom.jsonl", rows)
    info = {"custom": {"file_name": "custom.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "dialog", "images": "pics"},
                       "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "U", "assistant_tag": "A"}}}
    (ds / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    samples = sg.load_validated(ds, "custom")
    assert samples[0].messages[1] == {"role": "assistant", "content": 'PICK_OBJECT(object="red cube")'}
    assert samples[0].images == [ds / "a.png"]


def test_registration_without_images_column_behaves_like_llamafactory(ds):
    write_array(ds / "x.json", [good()])
    info = {"x": {"file_name": "x.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}}}
    (ds / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    samples, errors = sg.read_samples(ds, "x")
    assert errors == []
    msg = only_error(sg.validate(samples))
    assert msg.startswith(f"{ds / 'x.json'}:2:") and "1 <image> tag in the messages but 0 images" in msg
    assert "columns.images" in msg


def test_unknown_dataset_name_lists_registered(ds):
    (ds / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}, "b": {}}), encoding="utf-8")
    with pytest.raises(sg.DatasetInvalid) as e:
        sg.load_dataset_dir(ds, "nope")
    assert "'nope' is not registered (registered: a, b)" in str(e.value)


def test_wrong_message_keys_point_at_the_message(ds):
    f = write_array(ds / "bad.json", [good(), _conversations()])  # auto-detected as messages/role/content
    samples, errors = sg.read_samples(f)
    assert len(samples) == 1
    msg = only_error(errors)
    assert msg.startswith(f"{f}:3:1: missing messages column 'messages'")


# ---------------------------------------------------------------------------------------------
# broken files: exact file:line(:col)
# ---------------------------------------------------------------------------------------------


def test_bad_json_array_reports_decoder_position(ds):
    f = ds / "bad.json"
    f.write_text('[\n  {"messages": [], "images": []},\n  {"messages": [\n     tru ]}\n]\n', encoding="utf-8")
    samples, errors = sg.read_samples(f)
    assert len(samples) == 1
    assert only_error(errors) == f"{f}:4:6: invalid JSON: Expecting value"
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(f.read_text())
    assert (e.value.lineno, e.value.colno) == (4, 6)  # the same position json itself reports


def test_missing_comma_between_samples(ds):
    f = ds / "bad.json"
    f.write_text("[\n" + json.dumps(good()) + "\n" + json.dumps(good()) + "\n]", encoding="utf-8")
    _, errors = sg.read_samples(f)
    assert only_error(errors).startswith(f"{f}:3:1: invalid JSON: expected ',' or ']'")


def test_bad_json_line_in_jsonl(ds):
    f = write_lines(ds / "bad.jsonl", [good(), good(), '{"messages": [}', good()])
    samples, errors = sg.read_samples(f)
    assert len(samples) == 3  # a bad line costs only itself
    assert only_error(errors).startswith(f"{f}:3:15: invalid JSON:")


def test_image_count_mismatch(ds):
    row = good()
    row["images"] = ["a.png", "a.png"]
    f = write_array(ds / "x.json", [good(), row])
    msg = only_error(sg.validate(sg.load_file(f)))
    col = col_of(f, 3, '["a.png", "a.png"]')
    assert msg == f"{f}:3:{col}: 1 <image> tag in the messages but 2 images"


def test_missing_image(ds):
    row = good()
    row["images"] = ["nowhere/missing.png"]
    f = write_lines(ds / "x.jsonl", [good(), good(), row])
    msg = only_error(sg.validate(sg.load_file(f)))
    col = col_of(f, 3, '"nowhere/missing.png"')
    assert msg.startswith(f"{f}:3:{col}: image not found")
    assert "missing.png" in msg


def test_undecodable_image(ds):
    row = good()
    row["images"] = ["broken.png"]
    f = write_array(ds / "x.json", [row])
    msg = only_error(sg.validate(sg.load_file(f)))
    col = col_of(f, 2, '"broken.png"')
    assert msg.startswith(f"{f}:2:{col}: image cannot be decoded")
    assert sg.validate(sg.load_file(f), check_images=False) == []


def test_roles_out_of_order(ds):
    row = good()
    row["messages"] = [row["messages"][0], row["messages"][2], row["messages"][1]]  # system, assistant, user
    f = write_array(ds / "x.json", [good(), good(), row])
    msg = only_error(sg.validate(sg.load_file(f)))
    col = col_of(f, 4, '{"role": "assistant"')
    assert msg.startswith(f"{f}:4:{col}: roles out of order: message 1 is 'assistant' where 'user' was expected")


def test_conversation_must_end_with_assistant(ds):
    row = good()
    row["messages"] = row["messages"][:2]
    f = write_array(ds / "x.json", [row])
    msg = only_error(sg.validate(sg.load_file(f)))
    assert msg.startswith(f"{f}:2:") and "must end with an assistant answer" in msg


def test_empty_answer(ds):
    f = write_lines(ds / "x.jsonl", [good(answer="  \n ")])
    msg = only_error(sg.validate(sg.load_file(f)))
    col = col_of(f, 1, json.dumps("  \n "))
    assert msg == f"{f}:1:{col}: empty assistant answer (message 2)"


@pytest.mark.parametrize("answer", ['FLY_AWAY(object="red cube")', 'MOVE_OBJECT(object="red cube")',
                                    'PICK_OBJECT(object="pink elephant")', "I cannot do that"])
def test_parser_rejected_answer_in_actions_mode(ds, vocab, answer):
    f = write_array(ds / "x.json", [good(), good(answer=answer)])
    samples = sg.load_file(f)
    assert sg.validate(samples) == []  # plain mode does not look at the answer's meaning
    with pytest.raises(ParseError) as expected:
        parse_actions(answer, vocab)
    msg = only_error(sg.validate(samples, vocab=vocab))
    col = col_of(f, 3, json.dumps(answer))
    assert msg == f"{f}:3:{col}: answer rejected by the action parser: {expected.value.reason}"


def test_validate_limit(ds):
    f = write_array(ds / "x.json", [good(answer="")] * 5)
    assert len(sg.validate(sg.load_file(f))) == 5
    assert len(sg.validate(sg.load_file(f), limit=2)) == 2


# ---------------------------------------------------------------------------------------------
# load_validated / skip-invalid / DatasetInvalid
# ---------------------------------------------------------------------------------------------


def test_skip_invalid_drops_and_counts(ds, vocab):
    bad_image = good()
    bad_image["images"] = ["missing.png"]
    rows = [good(), good(answer=""), bad_image, good(), '{"broken": ', good(answer="NOPE()"), good()]
    f = write_lines(ds / "x.jsonl", rows)
    with pytest.raises(sg.DatasetInvalid) as e:
        sg.load_validated(f, vocab=vocab)
    assert len(e.value.errors) == 4
    text = str(e.value)
    assert text.startswith("dataset is invalid (4 errors):")
    assert f"{f}:5:" in text and f"{f}:2:" in text and f"{f}:3:" in text and f"{f}:6:" in text
    kept = sg.load_validated(f, vocab=vocab, skip_invalid=True)
    assert len(kept) == 3 and kept.dropped == 4 and len(kept.errors) == 4
    assert [s.source for s in kept] == [f"{f}:1", f"{f}:4", f"{f}:7"]


def test_skip_invalid_cannot_skip_a_broken_array(ds):
    f = ds / "x.json"
    f.write_text("[\n" + json.dumps(good()) + ",\n{oops}\n]", encoding="utf-8")
    with pytest.raises(sg.DatasetInvalid):
        sg.load_validated(f, skip_invalid=True)


def test_dataset_invalid_lists_a_limited_number():
    errors = [sg.DataError("f.json", i, 1, "bad") for i in range(1, 31)]
    text = str(sg.DatasetInvalid(errors, max_listed=5))
    assert "f.json:5:1: bad" in text and "f.json:6:1" not in text
    assert text.endswith("... and 25 more")
    assert str(errors[0]) == "f.json:1:1: bad"


# ---------------------------------------------------------------------------------------------
# writing and hashing
# ---------------------------------------------------------------------------------------------


def test_write_roundtrip_and_registration(ds):
    src = write_lines(ds / "in.jsonl", [good(), good(answer="STOP()")])
    samples = sg.load_file(src)
    out = ds / "out"
    (out / "imgs").mkdir(parents=True)
    cv2.imwrite(str(out / "imgs" / "b.png"), np.zeros((8, 8, 3), np.uint8))
    samples[1].images = [out / "imgs" / "b.png"]
    sg.write_sharegpt(out / "set.json", samples, dataset_info_name="mine")
    sg.write_sharegpt(out / "set2.jsonl", samples, dataset_info_name="mine_lines")
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"mine", "mine_lines"} and info["mine"]["file_name"] == "set.json"
    rows = json.loads((out / "set.json").read_text())
    assert rows[1]["images"] == ["imgs/b.png"]  # relative to the dataset dir
    assert Path(rows[0]["images"][0]).is_absolute()  # outside it: absolute
    for name in ("mine", "mine_lines"):
        back = sg.load_validated(out, name)
        assert [s.messages for s in back] == [s.messages for s in samples]
        assert [s.images for s in back] == [[ds / "a.png"], [out / "imgs" / "b.png"]]
    before = (out / "set.json").read_bytes()
    sg.write_sharegpt(out / "set.json", samples, dataset_info_name="mine")
    assert (out / "set.json").read_bytes() == before  # deterministic


def test_dataset_sha256(ds):
    f = write_array(ds / "x.json", [good()])
    h_file, h_dir = sg.dataset_sha256(f), sg.dataset_sha256(ds)
    assert len(h_file) == 64 and h_file != h_dir
    assert sg.dataset_sha256(ds) == h_dir
    cv2.imwrite(str(ds / "a.png"), np.zeros((12, 16, 3), np.uint8))  # an image changes -> the dir hash changes
    assert sg.dataset_sha256(ds) != h_dir and sg.dataset_sha256(f) == h_file


def _many_images(ds, count):
    for k in range(count):
        cv2.imwrite(str(ds / f"im{k}.png"), np.full((12, 16, 3), k, np.uint8))
    return write_array(ds / "many.json", [dict(good(), images=[f"im{k}.png"]) for k in range(count)])


@pytest.mark.parametrize("parallel", [False, True])
def test_validation_hashes_each_image_as_dataset_sha256_would(ds, monkeypatch, parallel):
    """The images' digests come from the bytes validation read, and the run's digest built from
    them is the one that reads every image again."""
    from training.train import _digest

    f = _many_images(ds, 6)
    if parallel:  # worker processes, as on a machine with cores to spare
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        real = sg._check_images_in_parallel
        monkeypatch.setattr(sg, "_check_images_in_parallel",
                            lambda paths, cache, digests=None: real(paths, cache, digests, chunk=2))
    got = sg.load_validated(f)
    images = [str(ds / f"im{k}.png") for k in range(6)]
    assert got.image_sha256 == {img: sg.dataset_sha256(img) for img in images}
    assert _digest(list(got), [f], got.image_sha256) == _digest(list(got), [f])
    cv2.imwrite(images[3], np.zeros((12, 16, 3), np.uint8))  # an image re-rendered -> another digest
    assert sg.load_validated(f).image_sha256[images[3]] != got.image_sha256[images[3]]
    assert sg.load_validated(f, check_images=False).image_sha256 == {}


@pytest.mark.parametrize("parallel", [False, True])
def test_answers_are_classified_alike_by_worker_processes(ds, monkeypatch, parallel):
    """The action parser reads a large dataset's answers in worker processes: the same verdict, and
    the same answer named as a likely typo (file and line), as one process reading them."""
    from vla_node.vocabulary import Vocabulary

    rows = [good() for _ in range(9)] + [good(answer="MOVE_OBJECT(object=\"red cube\", destination=\"moon\")")]
    f = write_array(ds / "many.json", rows)
    if parallel:  # worker processes, as on a machine with cores to spare
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        real = sg._parse_in_parallel
        monkeypatch.setattr(sg, "_parse_in_parallel", lambda texts, vocab: real(texts, vocab, chunk=3))
    with pytest.raises(sg.DatasetInvalid) as caught:
        sg.load_validated(f, vocab=Vocabulary.load())
    message = str(caught.value)
    assert f"{f}:11:" in message and "likely a typo: 9 of 10 answers of this dataset parse as actions" in message
    got = sg.load_validated(f, vocab=Vocabulary.load(), skip_invalid=True)
    assert len(got) == 9 and got.verdict.parsed == 9 and got.verdict.answers == 10


# ---------------------------------------------------------------------------------------------
# vla-data check
# ---------------------------------------------------------------------------------------------


def test_cli_check_reports_errors_and_exit_codes(ds, capsys):
    f = write_lines(ds / "x.jsonl", [good(), good(answer="NOPE()"), "{bad"])
    assert data_main(["check", str(f)]) == 1
    out = capsys.readouterr().out
    assert f"{f}:3:2: invalid JSON" in out and "samples: 2 read, 2 valid" in out and "estimated" in out
    assert data_main(["check", str(f), "--actions"]) == 1
    out = capsys.readouterr().out
    assert f"{f}:2:" in out and "answer rejected by the action parser: unknown verb 'NOPE'" in out
    assert data_main(["check", str(f), "--actions", "--skip-invalid"]) == 0
    assert "2 invalid sample(s) would be dropped, 1 kept" in capsys.readouterr().out
    assert data_main(["check", str(f), "--actions", "--max-errors", "1"]) == 1
    assert "... and 1 more error(s)" in capsys.readouterr().out
    ok = write_array(ds / "ok.json", [good(), good()])
    assert data_main(["check", str(ok), "--actions"]) == 0
    out = capsys.readouterr().out
    assert "samples: 2 read, 2 valid" in out and "turns (assistant answers): 2" in out and "OK: no errors" in out


def test_cli_check_with_tokenizer_file(ds, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ds / "tokenizer.json"))
    f = write_array(ds / "x.json", [good()])
    assert data_main(["check", str(f), "--tokenizer", str(ds)]) == 0
    out = capsys.readouterr().out
    assert f"counted with {ds / 'tokenizer.json'}" in out
