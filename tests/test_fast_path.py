"""vla-train's fast path for small models (training/fast_path.py): data encoded once into tensors,
the shared prompt prefix computed once per batch. Everything is checked against the ordinary path
on real tiny checkpoints: the encoded ids, labels and pixels, the loss and every gradient (three
model families, and a LoRA adapter with a module trained in full), and whole vla-train runs whose
logged losses must agree step by step. CPU."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures_train import train_overrides, training_collator

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]

BATCH = [0, 3, 5, 7]


def _samples(data_dir: Path, name: str = "tabletop_train"):
    from training import sharegpt
    from vla_node.vocabulary import Vocabulary

    return sharegpt.load_validated(str(data_dir), name, vocab=Vocabulary.load())


def _fast_path(collator, encoded):
    from training.encoded_tensors import processor_arithmetic
    from training.fast_path import BatchBuilder, FastPath

    builder = BatchBuilder({"train": encoded}, processor_arithmetic(collator.processor.image_processor),
                           torch.device("cpu"))
    return FastPath(train=encoded, eval=None, builder=builder, bf16=False)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _compare_to_ordinary(model, collator, samples, encoded):
    fast = _fast_path(collator, encoded)
    model.zero_grad()
    ordinary = model(**collator([samples[i] for i in BATCH])).loss
    ordinary.backward()
    want = _gradients(model)
    model.zero_grad()
    loss = fast.loss(model, fast.builder([("train", i) for i in BATCH]))
    loss.backward()
    got = _gradients(model)
    assert float(loss.detach()) == pytest.approx(float(ordinary.detach()), rel=1e-5)
    assert set(got) == set(want) and want
    for name in want:
        scale = float(want[name].abs().max()) + 1e-8
        assert float((got[name] - want[name]).abs().max()) <= 1e-4 * scale, name


def test_encoded_tensors_hold_what_the_collator_makes(train_model_dir, synth_box_dir):
    from training.encoded_tensors import encode_samples, pixel_values_of, processor_arithmetic

    collator = training_collator(train_model_dir)
    samples = _samples(synth_box_dir, "tabletop_val")
    encoded = encode_samples(samples, collator, workers=2)  # forked workers, frames through a file mapping
    again = encode_samples(samples, collator, workers=0)
    assert torch.equal(encoded.ids, again.ids) and torch.equal(encoded.frames, again.frames)
    arithmetic = processor_arithmetic(collator.processor.image_processor)
    for i, sample in enumerate(samples):
        want = collator.encode(sample)
        length = int(encoded.lengths[i])
        assert torch.equal(encoded.ids[i, :length].long(), want["input_ids"])
        assert int(encoded.answer_starts[i]) == int((want["labels"] != -100).nonzero()[0])
        assert torch.equal(torch.tensor([encoded.grid_thw]), want["image_grid_thw"])
        assert torch.allclose(pixel_values_of(encoded.frames[i:i + 1], arithmetic), want["pixel_values"], atol=1e-5)
    # every prompt shares the system text and the user turn's opening, up to the image
    image = collator.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int(encoded.ids[0, encoded.prefix_length]) == image
    assert image not in encoded.ids[:, :encoded.prefix_length]


def test_encodings_in_two_threads_each_hold_their_own_samples(train_model_dir, synth_dir, synth_box_dir):
    """A build encodes the next training's data in a thread while another encoding may run: the
    encodings take turns (the workers' shared state is one per process), each gets its own samples."""
    import threading

    from training.encoded_tensors import encode_samples

    collator = training_collator(train_model_dir)
    sets = {"a": _samples(synth_dir), "b": _samples(synth_box_dir, "tabletop_val")}
    alone = {name: encode_samples(samples, collator) for name, samples in sets.items()}
    together: dict = {}
    threads = [threading.Thread(target=lambda n=name: together.__setitem__(n, encode_samples(sets[n], collator)))
               for name in sets for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in sets:
        assert torch.equal(together[name].ids, alone[name].ids)
        assert torch.equal(together[name].frames, alone[name].frames)


def test_data_prepared_ahead_in_a_thread_trains_as_train_prepares_it(train_model_dir, synth_dir, tmp_path):
    """prepare_data(place=False) in a thread, from another folder holding the same processor (a build
    prepares the base's data from the stage before it): train() with it logs the losses of a run
    that prepared its own data."""
    import threading

    from training.config import load_config
    from training.train import prepare_data, train

    same_processor = tmp_path / "earlier_stage"
    shutil.copytree(train_model_dir, same_processor)
    runs = {}
    for name in ("own", "ahead"):
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / name, max_steps=3,
                                                logging_steps=1, fast_path="true"))
        prepared = None
        if name == "ahead":
            ahead = load_config(None, train_overrides(same_processor, synth_dir, tmp_path / "unused", fast_path="true"))
            made: dict = {}
            thread = threading.Thread(target=lambda: made.setdefault("data", prepare_data(ahead, place=False)))
            thread.start()
            thread.join()
            prepared = made["data"]
        result = train(cfg, prepared=prepared)
        runs[name] = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(runs["own"]) == 3 and runs["ahead"] == runs["own"]


def test_data_prepared_for_other_settings_or_another_processor_is_refused(train_model_dir, tiny_checkpoints,
                                                                          synth_dir, tmp_path):
    from training.config import ConfigError, load_config
    from training.train import prepare_data, train

    prepared = prepare_data(load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / "a",
                                                              fast_path="true")), place=False)
    other_seed = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / "b", seed=1,
                                                   fast_path="true"))
    with pytest.raises(ConfigError, match=r"prepared ahead was made for other settings .*seed: 0 prepared, 1 here"):
        train(other_seed, prepared=prepared)
    other_model = load_config(None, train_overrides(tiny_checkpoints["qwen3_vl"], synth_dir, tmp_path / "c",
                                                    fast_path="true"))
    with pytest.raises(ConfigError, match=r"the processor of .*qwen3"):
        train(other_model, prepared=prepared)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before any training


@pytest.mark.parametrize("block_attention", [False, True], ids=["per_image_attention", "block_attention"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shared_prefix_loss_and_gradients_equal_the_ordinary_forward(family, block_attention, tiny_checkpoints,
                                                                     synth_dir):
    """The fast path runs the batch's images as the frames of one clip (shared_prefix.one_clip_grid),
    with the vision attention vla-train uses on CUDA (one call a layer) or transformers' own."""
    from transformers import AutoModelForImageTextToText

    from training.encoded_tensors import encode_samples
    from vla_node.backends.engine.vision_attention import use_block_attention

    collator = training_collator(tiny_checkpoints[family])
    samples = _samples(synth_dir)
    encoded = encode_samples(samples, collator)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[family], dtype=torch.float32,
                                                        attn_implementation="sdpa")
    assert not block_attention or use_block_attention(model)
    torch.manual_seed(0)
    for p in model.parameters():  # random init is near-uniform: make every gradient large enough to compare
        p.data.normal_(0.0, 0.05)
    _compare_to_ordinary(model, collator, samples, encoded)


@pytest.mark.parametrize("block_attention", [False, True], ids=["per_image_attention", "block_attention"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_vision_tower_takes_its_grid_inputs_computed_once(family, block_attention, tiny_checkpoints, synth_dir,
                                                               monkeypatch):
    """A fast-path step hands the tower its grid-derived inputs (position ids, segment bounds, window
    order, position-table taps) computed at the first step: later steps never call transformers'
    helpers that build them (Python loops, values read back from the GPU), and the loss is unchanged."""
    import sys

    from transformers import AutoModelForImageTextToText

    from training.encoded_tensors import encode_samples
    from training.shared_prefix import _GRID_HELPERS
    from vla_node.backends.engine.vision_attention import use_block_attention

    collator = training_collator(tiny_checkpoints[family])
    encoded = encode_samples(_samples(synth_dir), collator)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[family], dtype=torch.float32,
                                                        attn_implementation="sdpa")
    assert not block_attention or use_block_attention(model)
    fast = _fast_path(collator, encoded)
    inputs = fast.builder([("train", i) for i in BATCH])
    with torch.no_grad():
        first = float(fast.loss(model, inputs))
    assert fast.shared_prefix_agrees
    helpers = sys.modules[type(model.model.visual).__module__]
    names = [name for name in vars(helpers) if name.startswith("get_vision_")]
    assert names  # this transformers builds them with its vision_utils helpers

    def given_only(name):  # a helper returns what it is given under its key, else builds it from the grid
        original, key = getattr(helpers, name), _GRID_HELPERS[name][0]

        def helper(*args, kwargs=None, **options):
            if key not in (kwargs or {}):
                raise AssertionError(f"the tower built {key} from its grid ({name})")
            return original(*args, kwargs=kwargs, **options)
        return helper

    for name in names:
        monkeypatch.setattr(helpers, name, given_only(name))
    with torch.no_grad():
        assert float(fast.loss(model, inputs)) == first


def test_label_positions_select_what_the_label_mask_selects():
    from training.collate import IGNORE_INDEX
    from training.fast_path import label_positions

    generator = torch.Generator().manual_seed(0)
    width = 40
    lengths = torch.randint(5, width + 1, (9,), generator=generator)
    starts = [int(torch.randint(1, int(n), (1,), generator=generator)) for n in lengths]
    labels = torch.full((9, width), IGNORE_INDEX)
    for row, (start, end) in enumerate(zip(starts, lengths.tolist())):
        labels[row, start:end] = 7
    want = (labels[:, 1:] != IGNORE_INDEX)
    got = label_positions(starts, lengths.tolist(), width)
    # flat index row * width + j: position j predicts token j + 1
    assert got.tolist() == [row * width + j for row, j in want.nonzero().tolist()]


def test_shared_prefix_with_a_lora_adapter_and_a_fully_trained_embedding(train_model_dir, synth_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from training.encoded_tensors import encode_samples
    from training.train import lora_target_regex

    collator = training_collator(train_model_dir)
    samples = _samples(synth_dir)
    encoded = encode_samples(samples, collator)
    model = AutoModelForImageTextToText.from_pretrained(train_model_dir, dtype=torch.float32)
    regex, _ = lora_target_regex(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex, init_lora_weights=False,
                                             modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"))
    _compare_to_ordinary(model, collator, samples, encoded)
    assert any("modules_to_save" in name and "embed_tokens" in name and p.grad is not None
               for name, p in model.named_parameters())


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


def test_vla_train_fast_path_logs_the_ordinary_paths_losses(train_model_dir, synth_dir, tmp_path, caplog):
    """A whole vla-train run each way, same seed and batches: the same loss at every step."""
    from training.config import load_config
    from training.train import train

    caplog.set_level(logging.INFO, logger="vla_train")
    runs = {}
    for choice in ("true", "false"):
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / choice, max_steps=4,
                                                logging_steps=1, save_steps=100, group_by_length="false",
                                                fast_path=choice))
        runs[choice] = train(cfg)
    fast, ordinary = _losses(runs["true"]), _losses(runs["false"])
    assert len(fast) == len(ordinary) == 4
    assert fast == pytest.approx(ordinary, rel=2e-4)
    assert fast[-1] < fast[0]  # and it learns
    assert "fast path: 28 training samples encoded once" in caplog.text
    manifest = json.loads((tmp_path / "true" / "vla_manifest.json").read_text())
    assert (tmp_path / "true" / "adapter_model.safetensors").is_file() and manifest["metrics"]["global_step"] == 4


def test_the_fast_path_does_not_read_each_steps_loss_back(train_model_dir, synth_dir, tmp_path):
    """transformers' NaN filter reads every step's loss back from the GPU; the fast path turns it off
    (its host must be free to queue the next step), the ordinary path keeps transformers' default."""
    from training.config import load_config
    from training.train import training_args_for

    cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / "run"))
    assert training_args_for(cfg, bf16=False, has_eval=False, fast_path=True).logging_nan_inf_filter is False
    assert training_args_for(cfg, bf16=False, has_eval=False, fast_path=False).logging_nan_inf_filter is True


def test_data_the_fast_path_cannot_serve_takes_the_ordinary_path(train_model_dir, synth_dir, tmp_path, caplog):
    """Frames of two sizes: auto falls back with the reason in the log; true refuses to start."""
    import cv2

    from training.config import ConfigError, load_config
    from training.train import train

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    first = json.loads((data / "train.json").read_text())[0]["images"][0]
    image = cv2.imread(str(data / first))
    cv2.imwrite(str(data / first), cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2)))
    caplog.set_level(logging.INFO, logger="vla_train")
    with pytest.raises(ConfigError, match="fast_path=true, but images of different sizes"):
        train(load_config(None, train_overrides(train_model_dir, data, tmp_path / "a", max_steps=1, fast_path="true")))
    result = train(load_config(None, train_overrides(train_model_dir, data, tmp_path / "b", max_steps=1)))
    assert result.global_step == 1
    assert "ordinary training path: the fast path does not serve images of different sizes" in caplog.text


def test_a_dead_encoding_worker_stops_the_encoding_with_a_reason(train_model_dir, synth_box_dir, monkeypatch):
    """A worker killed mid-chunk (the OOM killer; SIGBUS when the frame mapping's disk fills) loses its
    task, and multiprocessing.Pool would wait for it forever: the encoding stops within
    ENCODE_STALL_S with what is known instead."""
    import os
    import signal

    from training import encoded_tensors
    from training.encoded_tensors import EncodeStalled, encode_samples

    collator = training_collator(train_model_dir)
    samples = _samples(synth_box_dir, "tabletop_val")
    victim = str(encoded_tensors._images_of(samples[-1])[0])
    load_rgb = encoded_tensors.load_rgb

    def killed_at_the_last_image(image):  # runs in the forked worker
        if str(image) == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return load_rgb(image)

    monkeypatch.setattr(encoded_tensors, "load_rgb", killed_at_the_last_image)
    monkeypatch.setattr(encoded_tensors, "CHUNK", 2)
    monkeypatch.setattr(encoded_tensors, "ENCODE_STALL_S", 3.0)

    def hung(signum, frame):
        raise AssertionError("encode_samples hung on a dead worker")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(EncodeStalled, match=r"no chunk of 2 samples finished in 3 s \(\d+ of "
                                                 rf"{len(samples)} samples encoded\): a worker died"):
            encode_samples(samples, collator, workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_too_little_scratch_space_for_the_workers_frames_is_named(train_model_dir, synth_box_dir, monkeypatch):
    """The workers write the frames into a file mapping in TMPDIR, or /dev/shm where TMPDIR lacks room;
    a folder too small would kill them mid-write, so with room in neither the fast path declines up
    front (vla-train then takes the ordinary path)."""
    from training import encoded_tensors
    from training.encoded_tensors import NotEncodable, encode_samples

    collator = training_collator(train_model_dir)
    samples = _samples(synth_box_dir, "tabletop_val")
    monkeypatch.setattr(encoded_tensors, "CHUNK", 2)  # several chunks: the workers' path
    monkeypatch.setattr(encoded_tensors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 0))
    with pytest.raises(NotEncodable, match=r"data whose frames need \d+\.\d MB of scratch space for the encoding "
                                            r"workers, with 0\.0 MB free in [^ ]+(, 0\.0 MB free in /dev/shm)? "
                                            r"\(point TMPDIR at a larger disk"):
        encode_samples(samples, collator, workers=2)
    assert len(encode_samples(samples, collator, workers=0)) == len(samples)  # in memory: no scratch needed


def test_the_workers_frames_go_to_memory_where_the_temporary_disk_lacks_room(train_model_dir, synth_box_dir,
                                                                              monkeypatch, caplog):
    """On the GPU machines the disk under /tmp had 34 GB free for a 36 GB build's frames while
    /dev/shm (memory) had 128 GB: the fast path stages them there instead of declining."""
    import tempfile

    from training import encoded_tensors
    from training.encoded_tensors import encode_samples

    if not encoded_tensors._memory_backed("/dev/shm"):
        pytest.skip("no memory-backed /dev/shm here")
    collator = training_collator(train_model_dir)
    samples = _samples(synth_box_dir, "tabletop_val")
    reference = encode_samples(samples, collator, workers=0)
    monkeypatch.setattr(encoded_tensors, "CHUNK", 2)
    real_usage, full = shutil.disk_usage, tempfile.gettempdir()
    monkeypatch.setattr(encoded_tensors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 0)
                        if path == full else real_usage(path))
    caplog.set_level(logging.INFO, logger="training.encoded_tensors")
    staged = encode_samples(samples, collator, workers=2)
    assert torch.equal(staged.frames, reference.frames) and torch.equal(staged.ids, reference.ids)
    assert any("go to /dev/shm" in r.getMessage() and f"{full} lacks room" in r.getMessage() for r in caplog.records)


def test_scratch_goes_to_the_first_folder_with_room_and_memory_counts_for_tmpfs(tmp_path, monkeypatch):
    """Real folders, real free space: the first candidate without room is passed over; a tmpfs
    folder's room is capped by the memory available (its files take memory), a disk's is not."""
    from training import encoded_tensors
    from training.encoded_tensors import NotEncodable, _memory_available, _memory_backed, scratch_folder

    disk_free = shutil.disk_usage(tmp_path).free
    assert scratch_folder(1, [str(tmp_path)]) == str(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(NotEncodable,
                       match=rf"need {disk_free * 2 / 1e9:.1f} GB of scratch space .* free in {tmp_path}"):
        scratch_folder(disk_free * 2, [str(tmp_path), str(other)])
    if not (os.path.isdir("/dev/shm") and _memory_backed("/dev/shm")) or _memory_backed(str(tmp_path)):
        pytest.skip("needs a memory-backed /dev/shm and a disk-backed temporary folder")
    shm_room = min(shutil.disk_usage("/dev/shm").free, _memory_available())
    if shm_room < 0.9 * disk_free:  # /dev/shm too small for what the disk holds: the disk is taken
        assert scratch_folder(shm_room, ["/dev/shm", str(tmp_path)]) == str(tmp_path)
    monkeypatch.setattr(encoded_tensors, "_memory_available", lambda: 10**6)  # 1 MB of memory left
    with pytest.raises(NotEncodable, match=r"with 1\.0 MB free in /dev/shm"):
        scratch_folder(10**7, ["/dev/shm"])
    assert scratch_folder(10**7, ["/dev/shm", str(tmp_path)]) == str(tmp_path)  # the disk's room is its own


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_shared_prefix_on_cuda_equals_the_ordinary_forward(bf16, train_model_dir, synth_dir):
    """On the GPU, where a bf16 build once trained a model blind to its own command: the fast path's
    loss (bf16 autocast or fp32) equals the ordinary forward's, and so does the self-check's verdict."""
    from transformers import AutoModelForImageTextToText

    from training.encoded_tensors import encode_samples, processor_arithmetic
    from training.fast_path import BatchBuilder, FastPath
    from training.shared_prefix import ordinary_inputs

    collator = training_collator(train_model_dir)
    samples = _samples(synth_dir)
    encoded = encode_samples(samples, collator).to("cuda")
    model = AutoModelForImageTextToText.from_pretrained(train_model_dir, dtype=torch.float32).cuda()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05)
    builder = BatchBuilder({"train": encoded}, processor_arithmetic(collator.processor.image_processor),
                           torch.device("cuda"))
    fast = FastPath(train=encoded, eval=None, builder=builder, bf16=bf16)
    inputs = builder([("train", i) for i in range(8)])
    loss = float(fast.loss(model, inputs).detach())
    assert fast.shared_prefix_agrees is True
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
        ordinary = float(model(**ordinary_inputs(model, **inputs)).loss)
    assert loss == pytest.approx(ordinary, rel=0.02 if bf16 else 1e-4)


def test_torch_compile_compiles_each_layer_and_keeps_the_loss(train_model_dir, synth_dir, tmp_path, caplog):
    """vla-train torch_compile=true (backend aot_eager here: the forward and backward graphs inductor
    would generate code for, traced and run on the CPU): every decoder layer and vision block compiled,
    the uncompiled run's loss at every step, the adapter saved under the same names."""
    import torch._dynamo
    from safetensors import safe_open

    from training.config import load_config
    from training.train import train

    caplog.set_level(logging.INFO, logger="vla_train")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = {}
    for choice in ("false", "true"):
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / choice, max_steps=3,
                                                logging_steps=1, save_steps=100, group_by_length="false",
                                                fast_path="true", torch_compile=choice,
                                                torch_compile_backend="aot_eager"))
        runs[choice] = train(cfg)
    assert _losses(runs["true"]) == pytest.approx(_losses(runs["false"]), rel=1e-5)
    config = json.loads((train_model_dir / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"] + config["vision_config"]["depth"]
    assert f"torch_compile: {layers} layers compiled one by one (backend aot_eager" in caplog.text
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # text layers and vision blocks

    def names(run):
        with safe_open(str(tmp_path / run / "adapter_model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert names("true") == names("false")
    torch._dynamo.reset()


@pytest.mark.parametrize("free_gb, total_gb, data_gb, where", [
    (79, 80, 44.9, "cuda"),   # the embedded base on an H100: 34 GB left, the reserve is 20
    (79, 80, 60, "cpu"),      # 19 GB left: under the reserve
    (23, 24, 10, "cuda"),     # at most half the free memory: kept as before
    (23, 24, 12, "cpu"),      # 11 GB left, the reserve is 16
])
def test_the_encoded_data_stays_on_the_gpu_while_training_keeps_its_reserve(monkeypatch, caplog, free_gb, total_gb,
                                                                           data_gb, where):
    """Where prepare_fast_path keeps the encoded data: on the GPU when it leaves training the larger of
    a quarter of the card and 16 GB free (or takes at most half the free memory); else in host memory,
    saying how much was free."""
    import torch

    from training import fast_path

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(free_gb * 1e9), int(total_gb * 1e9)))
    caplog.set_level(logging.INFO, logger="vla_train")
    assert fast_path._storage_device(int(data_gb * 1e9)).type == where
    assert emptied  # an earlier stage's cached blocks count as free
    assert (f"the GPU has {free_gb:.1f} GB free" in caplog.text) == (where == "cpu")


def test_evaluation_compiles_nothing_under_torch_compile(train_model_dir, synth_dir, tmp_path):
    """torch_compile with an evaluation after every step (eval loss and the greedy answers a build logs):
    the evaluations run the compiled layers eagerly, so the run compiles exactly the graphs that the
    same training compiles without evaluating (generation's cache lengths would each add one)."""
    import torch._dynamo

    from training.build_embedded import generation_evaluator
    from training.config import load_config
    from training.train import train

    graphs, evaluated = {}, {}
    for name, extra in (("plain", {}), ("evaluated", {"eval_dataset": "tabletop_val", "eval_steps": 1})):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / name, max_steps=2,
                                                save_steps=100, fast_path="true", torch_compile="true",
                                                torch_compile_backend="eager", **extra))
        result = train(cfg, on_data=generation_evaluator(4))
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        evaluated[name] = [h["step"] for h in result.log_history if "gen_parse_valid_rate" in h]
    torch._dynamo.reset()
    assert not evaluated["plain"] and set(evaluated["evaluated"]) == {1, 2}  # greedy answers after each step
    assert graphs["evaluated"] == graphs["plain"] >= 2


def test_the_first_batch_check_compiles_nothing_under_torch_compile(train_model_dir, synth_dir, tmp_path,
                                                                   monkeypatch, caplog):
    """The check of the shared-prefix loss against the ordinary forward (a few rows of the first batch,
    without gradients) runs the compiled layers eagerly: a run compiles exactly the graphs of the same
    run with the check skipped (compiled, it added graphs training never reuses: 71-81 s an H100 stage)."""
    import torch._dynamo

    from training.config import load_config
    from training.fast_path import FastPath
    from training.train import train

    graphs = {}
    for name in ("checked", "unchecked"):
        if name == "unchecked":
            monkeypatch.setattr(FastPath, "_agrees_with_ordinary", lambda self, model, inputs, autocast: True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / name, max_steps=2,
                                                save_steps=100, fast_path="true", torch_compile="true",
                                                torch_compile_backend="eager"))
        with caplog.at_level(logging.INFO, logger="vla_train"):
            train(cfg)
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert "the shared-prefix loss equals the ordinary forward's" in caplog.text  # the check ran
    assert graphs["checked"] == graphs["unchecked"] >= 2


def test_dropping_the_last_batch_keeps_every_step_one_shape_under_torch_compile(train_model_dir, synth_dir,
                                                                               tmp_path):
    """dataloader_drop_last: 28 training samples at batch 5 are 5 full steps an epoch (not 5 and a step
    of 3), and two epochs compile no graph for a smaller batch (an H100 build stage lost 50 s to one)."""
    import torch._dynamo

    from training.config import load_config
    from training.train import train

    steps, graphs = {}, {}
    for drop in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / str(drop), max_steps=-1,
                                                num_train_epochs=2, per_device_train_batch_size=5, save_steps=100,
                                                fast_path="true", torch_compile="true", torch_compile_backend="eager",
                                                dataloader_drop_last=str(drop).lower()))
        result = train(cfg)
        steps[drop], graphs[drop] = result.global_step, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert steps == {False: 12, True: 10}
    assert graphs[True] < graphs[False]


def test_an_unknown_torch_compile_backend_is_named_with_the_config(train_model_dir, synth_dir, tmp_path):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"torch_compile_backend 'inductr' is not a torch.compile backend .*inductor"):
        load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path, torch_compile="true",
                                          torch_compile_backend="inductr"))


def test_compiled_layers_run_the_fast_step_as_one_graph_each(tiny_checkpoints, synth_dir):
    """With the vision attention vla-train uses on CUDA (one call a layer), no layer breaks its graph
    (a break would leave its work to eager dispatch) and loss and gradients are the uncompiled ones."""
    import torch._dynamo
    from transformers import AutoModelForImageTextToText

    from training.compile_layers import compile_layers, compiled_layers
    from training.encoded_tensors import encode_samples
    from vla_node.backends.engine.vision_attention import use_block_attention

    collator = training_collator(tiny_checkpoints["qwen3_vl"])
    encoded = encode_samples(_samples(synth_dir), collator)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["qwen3_vl"], dtype=torch.float32,
                                                        attn_implementation="sdpa")
    assert use_block_attention(model)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05)
    fast = _fast_path(collator, encoded)
    batch = fast.builder([("train", i) for i in BATCH])

    def step():
        model.zero_grad()
        loss = fast.loss(model, batch)
        loss.backward()
        return float(loss.detach()), _gradients(model)

    want_loss, want = step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_layers(model, "aot_eager") == len(compiled_layers(model))
    got_loss, got = step()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2
    assert got_loss == pytest.approx(want_loss, rel=1e-5) and set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max()) + 1e-8
        assert float((got[name] - want[name]).abs().max()) <= 1e-4 * scale, name
    torch._dynamo.reset()
