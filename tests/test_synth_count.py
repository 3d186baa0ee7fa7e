"""The counting task (training.synth_count): "how many of a named thing, and where" on the action
data's scenes. Its answers count what the scene holds, with the plans' boxes left to right; its
datasets are free-form text that vla-train reads and mixes with the action data behind one shared
prompt prefix (the fast path's), because every sample carries the serving prompt's system message."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import pytest

from training.build_embedded import synth_config
from training.synth import CONTAINER_SHAPES, SynthConfig, SynthError, Thing, _plural
from training.synth_count import QUESTION_KINDS, CountingScenes, generate_count_dataset
from vla_node.prompt import PromptBuilder
from vla_node.vocabulary import Vocabulary

N = 400  # questions drawn without pictures (well under a second)
EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "tabletop-tiny"
BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


class _SceneRecording(CountingScenes):
    """The real generator, keeping the scene each question was drawn on (every thing, not only the matches)."""

    def _question(self, rng):
        things, noun, kind = super()._question(rng)
        self.scene = things
        return things, noun, kind


@pytest.fixture(scope="module")
def drawn():
    scenes = _SceneRecording(synth_config(N, 11, ("en",)))  # the build's scenes: 320x240, model-pixel boxes
    samples = []
    for index in range(N):
        sample = scenes.count_sample(index, render=False)
        samples.append((sample, scenes.scene))
    return scenes, samples


def _counted(answer: str, noun: str) -> tuple[int, list[list[int]]]:
    """(the count the answer's words say, its boxes), checking the words are the CLARIFY reasons'."""
    boxes = [[int(v) for v in box] for box in BOX.findall(answer)]
    if answer == f"no {noun} is visible":
        return 0, boxes
    words = re.fullmatch(rf"(\d+) (.+) (?:is|are) visible: (\[.+\])", answer)
    assert words, answer
    count = int(words.group(1))
    assert words.group(2) == (noun if count == 1 else _plural(noun)), answer
    assert words.group(3) == ", ".join(f"[{a}, {b}, {c}, {d}]" for a, b, c, d in boxes), answer
    return count, boxes


def test_each_answer_counts_the_named_things_of_the_scene_with_their_boxes_left_to_right(drawn):
    scenes, samples = drawn
    kinds: Counter = Counter()
    counts: Counter = Counter()
    for sample, scene in samples:
        system, user, assistant = sample.messages
        assert user["content"] == f'<image>Count: "{sample.noun}"'
        named = [t for t in scene if t.label == sample.noun or t.shape == sample.noun]
        count, boxes = _counted(assistant["content"], sample.noun)
        assert count == len(named) == len(boxes), (sample.index, assistant["content"], scene)
        by_x = sorted(named, key=lambda t: (t.center[0], t.center[1]))
        assert boxes == [list(scenes.codec.to_model(t.as_box())) for t in by_x], (sample.index, scene)
        assert [b[0] + b[2] for b in boxes] == sorted(b[0] + b[2] for b in boxes), "left to right"
        kinds[sample.kind] += 1
        counts[count] += 1
        if sample.kind == "several":
            assert count >= 2, (sample.index, assistant["content"])
        elif sample.kind == "present":
            assert count == 1, (sample.index, assistant["content"])
    assert set(kinds) == set(QUESTION_KINDS)
    for kind, share in QUESTION_KINDS.items():
        assert abs(kinds[kind] / N - share) < 0.07, (kind, kinds)
    assert counts[0] > 0.2 * N and counts[1] > 0.15 * N and counts[2] + counts[3] > 0.15 * N, counts
    # the boxes are in the model's input pixels (the build's 320x240 frames are 320x224 for it), not the frame's
    assert scenes.codec.to_model(Thing("red cube", "red", "cube", "object", (0, 0, 320, 240)).as_box()) == \
        [0, 0, 320, 224]

def test_an_absent_lookalike_is_absent_and_shares_a_colour_or_shape_with_a_thing_of_its_kind_on_the_table(drawn):
    _, samples = drawn
    lookalikes = [(sample, scene) for sample, scene in samples if sample.kind == "absent_lookalike"]
    assert len(lookalikes) > 0.2 * N
    alike = 0
    for sample, scene in lookalikes:
        colour, shape = sample.noun.split()[0], sample.noun.split()[-1]
        assert len(sample.noun.split()) == 2, sample.noun  # a colour and a shape: a label, not a bare shape
        assert sample.noun not in {t.label for t in scene}
        assert sample.messages[2]["content"] == f"no {sample.noun} is visible"
        kind = "container" if shape in CONTAINER_SHAPES else "object"
        alike += any(t.kind == kind and (t.colour == colour or t.shape == shape) for t in scene)
    # any absent label would share one with a thing of its kind in about 7 scenes of 10
    assert alike >= 0.95 * len(lookalikes), (alike, len(lookalikes))


def test_the_same_config_writes_the_same_bytes_with_one_worker_or_two(tmp_path):
    cfg = synth_config(12, 5, ("en",))
    cfg.val_frac = 0.25
    reports = [generate_count_dataset(tmp_path / "a", cfg), generate_count_dataset(tmp_path / "b", cfg, workers=2)]
    files = [{p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
             for d in (tmp_path / "a", tmp_path / "b")]
    assert files[0] == files[1]
    assert set(files[0]) == {"count_train.json", "count_val.json", "dataset_info.json", "count_config.json"} | {
        f"images/{i:06d}.png" for i in range(12)}
    recorded = json.loads(files[0]["count_config.json"])
    assert recorded["config"]["seed"] == 5 and recorded["counts"] == {"train": 9, "val": 3}
    assert reports[0]["counts"] == reports[1]["counts"] == {"train": 9, "val": 3}
    assert reports[0]["kinds"] == reports[1]["kinds"] and sum(reports[0]["kinds"].values()) == 12
    image = cv2.imread(str(tmp_path / "a" / "images" / "000004.png"))
    assert image.shape == (240, 320, 3) and image.std() > 10, "a rendered scene"
    other = synth_config(12, 6, ("en",))
    other.val_frac = 0.25
    generate_count_dataset(tmp_path / "c", other)
    assert (tmp_path / "c" / "count_train.json").read_bytes() != files[0]["count_train.json"]
    assert (tmp_path / "c" / "images" / "000004.png").read_bytes() != files[0]["images/000004.png"]


def test_a_folder_written_again_holds_only_the_new_dataset(tmp_path):
    """An earlier run's files (a larger or a stopped one) do not linger beside the new dataset."""
    generate_count_dataset(tmp_path / "count", synth_config(12, 5, ("en",)))
    smaller = synth_config(5, 5, ("en",))
    generate_count_dataset(tmp_path / "count", smaller)
    fresh = tmp_path / "fresh"
    generate_count_dataset(fresh, smaller)
    assert {p.relative_to(tmp_path / "count") for p in (tmp_path / "count").rglob("*")} == \
        {p.relative_to(fresh) for p in fresh.rglob("*")}
    assert sorted(p.name for p in (tmp_path / "count" / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]


def test_the_datasets_are_declared_free_form_and_vla_train_reads_them_as_text(tmp_path):
    from training import sharegpt
    from training.config import load_config
    from training.train import answer_kinds_of, load_split

    cfg = synth_config(20, 5, ("en",))
    cfg.val_frac = 0.2
    generate_count_dataset(tmp_path / "count", cfg)
    info = json.loads((tmp_path / "count" / "dataset_info.json").read_text())
    assert set(info) == {"tabletop_count_train", "tabletop_count_val"}
    assert {name: (entry["file_name"], entry["vla_answers"]) for name, entry in info.items()} == {
        "tabletop_count_train": ("count_train.json", "text"), "tabletop_count_val": ("count_val.json", "text")}
    vocab = Vocabulary.load(None)
    for name, size in (("tabletop_count_train", 16), ("tabletop_count_val", 4)):
        samples = sharegpt.load_validated(str(tmp_path / "count"), name, vocab=vocab)
        assert samples.verdict.kind == "text" and len(samples) == size
    train_cfg = load_config(None, [f"model_path={EMBEDDED}", f"dataset_dir={tmp_path / 'count'}",
                                   f"dataset=tabletop_count_train,{tmp_path / 'count' / 'count_val.json'}"])
    samples, sha = load_split(train_cfg, train_cfg.datasets, vocab, "training")
    assert len(samples) == 20 and answer_kinds_of(samples) == ["text"] and len(sha) == 64


def test_counting_and_action_samples_share_the_compact_prompt_up_to_the_image(tmp_path):
    """The build mixes both into the base's data: the fast path encodes them as one set only if
    the prompts agree up to the image, so the counting samples carry the serving system message."""
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of, set_pixel_limits
    from training.config import load_config
    from training.encoded_tensors import NotEncodable, encode_samples
    from training.synth import generate_dataset
    from training.train import answer_kinds_of, load_split

    if not (EMBEDDED / "config.json").is_file():
        pytest.skip("the embedded model is not built: make models")
    vocab = Vocabulary.load(None)
    compact = PromptBuilder(vocab, template="compact")
    generate_dataset(tmp_path / "actions", synth_config(8, 3, ("en",)))
    generate_count_dataset(tmp_path / "count", synth_config(8, 4, ("en",)), "compact")
    rows = json.loads((tmp_path / "count" / "count_train.json").read_text())
    assert len(rows) == 8 and all(row["messages"][0] == {"role": "system", "content": compact.system_text}
                                  for row in rows)
    assert compact.system_text != PromptBuilder(vocab).system_text, "the compact prompt is not the default"
    train_cfg = load_config(None, [f"model_path={EMBEDDED}", f"dataset_dir={tmp_path / 'actions'}",
                                   f"dataset=tabletop_train,{tmp_path / 'count' / 'count_train.json'}",
                                   "prompt_template=compact"])
    samples, _ = load_split(train_cfg, train_cfg.datasets, vocab, "training")
    assert len(samples) == 16 and answer_kinds_of(samples) == ["actions", "text"]
    processor = AutoProcessor.from_pretrained(str(EMBEDDED))
    limits = pixel_limits_of(processor, 64 * 64, 320 * 240)  # the build's pixel limits
    set_pixel_limits(processor, limits)
    encoded = encode_samples(samples, VLACollator(processor, compact, limits))
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int(encoded.ids[0, encoded.prefix_length]) == image and encoded.grid_thw == (1, 14, 20)
    for i, sample in enumerate(samples):
        answer = processor.tokenizer.decode(encoded.ids[i, int(encoded.answer_starts[i]):int(encoded.lengths[i])])
        assert answer == sample.messages[-1]["content"] + "<|im_end|>"
    # a base trained on the full prompt: its action samples get that system message, the counting
    # samples keep theirs, and no prefix is shared
    with pytest.raises(NotEncodable, match="the prompts differ before the image"):
        encode_samples(samples, VLACollator(processor, PromptBuilder(vocab), limits))


def test_a_config_without_boxes_is_refused(tmp_path):
    with pytest.raises(SynthError, match="a counting dataset answers with boxes"):
        CountingScenes(SynthConfig(num=4, boxes="none"))
    with pytest.raises(SynthError, match="a counting dataset answers with boxes"):
        generate_count_dataset(tmp_path / "count", SynthConfig(num=4))
    assert not (tmp_path / "count").exists(), "refused before writing"
