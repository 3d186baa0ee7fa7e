"""vla-train's fast path for small models: data encoded once and kept on the device, the shared
prompt prefix computed once per batch.

A small model's step is short, so the ordinary path's per-epoch work (decode the PNG, fit it,
run the processor, tokenise the whole prompt, in DataLoader workers) and the ~400 identical
system-prompt tokens at the head of every sample are most of the cost. Here:

1. training.encoded_tensors encodes each sample once (in parallel processes) into token ids and
   the fitted uint8 frame, held on the training device (in host memory where they would leave
   training too little of the GPU: _storage_device);
2. a batch is assembled there (gathers, the processor's rescale/normalise/patchify as tensor ops);
3. training.shared_prefix computes the loss with the prefix's keys and values computed once, and
   hands the vision tower the batch's images (all of one size) as the frames of one clip, so its
   host work (position ids, splits) is done once per batch, not once per image; the tower's
   grid-derived inputs are computed once per batch size and given to it ready-made.

A small model's step is short enough that the host's work (one Python call and kernel launch per
operation) is what the GPU waits on, so a step also avoids making the host wait for the GPU: the
loss's label positions come from lengths known on the host (no boolean mask read back), host
tensors go to the GPU from pinned memory without a sync, and the Trainer's NaN filter (a read of
every step's loss) is off on this path; the host can then queue the next step while the GPU works.

Loss and gradients equal the ordinary path's (tests/test_fast_path.py). The Trainer (optimiser,
schedule, clipping, checkpoints, resume, logging, evaluation) is unchanged.

``fast_path: auto`` (the default) takes it whenever the data has its shape (one image per sample,
all of one size after fitting, one shared prompt prefix) and the run is a single process without
gradient checkpointing; ``true`` makes a mismatch an error; ``false`` always takes the ordinary path.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from training.collate import IGNORE_INDEX, VLACollator
from training.compile_layers import uncompiled
from training.config import ConfigError
from training.encoded_tensors import (EncodedTensors, NotEncodable, ProcessorArithmetic, default_workers,
                                      encode_samples, pixel_values_of, processor_arithmetic)
from training.shared_prefix import ordinary_inputs, rope_positions, shared_prefix_loss

log = logging.getLogger("vla_train")

__all__ = ["FastPath", "FastPathUnavailable", "prepare_fast_path", "IndexDataset"]

FAST_PATH_CHOICES = ("auto", "true", "false")


class FastPathUnavailable(ConfigError):
    """fast_path: true, but the run cannot take it (the message says why)."""


class IndexDataset(torch.utils.data.Dataset):
    """Sample i of split ``name`` is just (name, i): the batch builder gathers from the encoded
    tensors. ``lengths`` feeds the length-grouped sampler."""

    def __init__(self, name: str, encoded: EncodedTensors):
        self.name = name
        self.lengths = encoded.lengths.tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.name, index


@dataclass
class BatchBuilder:
    """The Trainer's data_collator: (split, index) items -> the shared-prefix loss's inputs."""

    splits: dict[str, EncodedTensors]
    arithmetic: ProcessorArithmetic
    device: torch.device
    lengths: dict[str, list[int]] = field(init=False)
    answer_starts: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:  # read once on the host: no device sync per batch
        self.lengths = {name: enc.lengths.tolist() for name, enc in self.splits.items()}
        self.answer_starts = {name: enc.answer_starts.tolist() for name, enc in self.splits.items()}

    def __call__(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        names = {name for name, _ in items}
        if len(names) != 1:
            raise ValueError(f"a batch mixes splits {sorted(names)}")
        name = names.pop()
        enc, lengths = self.splits[name], self.lengths[name]
        indices = [index for _, index in items]
        longest = max(lengths[i] for i in indices)
        rows = to_device(torch.as_tensor(indices), enc.ids.device)
        ids = enc.ids[rows, :longest].long()
        slot = torch.arange(longest, device=ids.device)
        answer = (slot[None, :] >= enc.answer_starts[rows, None]) & (slot[None, :] < enc.lengths[rows, None])
        labels = torch.where(answer, ids, torch.full_like(ids, IGNORE_INDEX))
        frames = to_device(enc.frames[rows.to(enc.frames.device)], self.device)
        prefix = enc.prefix_length
        positions = label_positions([self.answer_starts[name][i] - prefix for i in indices],
                                    [lengths[i] - prefix for i in indices], longest - prefix)
        return {
            "prefix_ids": to_device(ids[:1, :prefix], self.device),
            "input_ids": to_device(ids[:, prefix:], self.device),
            "labels": to_device(labels[:, prefix:], self.device),
            "pixel_values": pixel_values_of(frames, self.arithmetic),
            "image_grid_thw": to_device(torch.tensor([enc.grid_thw] * len(rows)), self.device),
            "label_positions": to_device(positions, self.device),
        }


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU: a plain copy from pageable memory
    waits for all the work queued before it (the previous step), so the host could never run ahead."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def label_positions(answer_starts: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """Flat indices (row * width + j) of the positions j whose next token is a label, in row-major
    order: what ``labels[:, 1:] != IGNORE_INDEX`` selects, known on the host from the lengths, so the
    loss gathers them without reading a mask back from the device (a sync every step)."""
    starts, ends = torch.as_tensor(answer_starts, dtype=torch.long), torch.as_tensor(lengths, dtype=torch.long)
    counts = ends - starts
    first = torch.arange(len(starts)) * width + starts - 1  # each row's first position
    before = torch.cumsum(counts, 0) - counts  # positions of the earlier rows
    return torch.arange(int(counts.sum())) + torch.repeat_interleave(first - before, counts)


@dataclass
class FastPath:
    train: EncodedTensors
    eval: EncodedTensors | None
    builder: BatchBuilder
    bf16: bool
    _positions: torch.Tensor | None = None
    # None until the first batch compared the shared-prefix loss with the ordinary forward's
    shared_prefix_agrees: bool | None = None

    @property
    def train_dataset(self) -> IndexDataset:
        return IndexDataset("train", self.train)

    @property
    def eval_dataset(self) -> IndexDataset | None:
        return IndexDataset("eval", self.eval) if self.eval is not None else None

    def positions(self, model, length: int) -> torch.Tensor:
        """rope_positions of the longest sample, computed once with the model's own code."""
        if self._positions is None:
            longest = [self.train] + ([self.eval] if self.eval is not None else [])
            widest = max(longest, key=lambda enc: enc.ids.shape[1])
            row = int(torch.argmax(widest.lengths))
            ids = widest.ids[row:row + 1, : int(widest.lengths[row])].long().to(self.builder.device)
            grid = torch.tensor([widest.grid_thw], device=self.builder.device)
            self._positions = rope_positions(model, ids, grid)
        if length > self._positions.shape[-1]:
            raise RuntimeError(f"a batch of {length} tokens is longer than the longest sample")
        return self._positions[:, :, :length]

    def loss(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(inputs)
        positions = inputs.pop("label_positions", None)
        total = inputs["prefix_ids"].shape[1] + inputs["input_ids"].shape[1]
        device_type = inputs["input_ids"].device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        if self.shared_prefix_agrees is None:
            self.shared_prefix_agrees = self._agrees_with_ordinary(model, inputs, autocast)
        with autocast:
            if not self.shared_prefix_agrees:
                return model(**ordinary_inputs(model, **inputs)).loss
            return shared_prefix_loss(model, position_ids=self.positions(model, total), same_size_images=True,
                                      label_positions=positions, image_grid=self.train.grid_thw, **inputs)

    def _agrees_with_ordinary(self, model, inputs, autocast) -> bool:
        """Once, on a few samples of the first batch: the shared-prefix loss must equal the ordinary
        forward's (bf16 rounding allowed); otherwise the run computes every batch the ordinary way
        (the data stays encoded on the device) and says so."""
        rows = min(4, inputs["input_ids"].shape[0])
        few = dict(inputs, input_ids=inputs["input_ids"][:rows], labels=inputs["labels"][:rows],
                   pixel_values=inputs["pixel_values"][: int(inputs["image_grid_thw"][:rows].prod(dim=-1).sum())],
                   image_grid_thw=inputs["image_grid_thw"][:rows])
        total = few["prefix_ids"].shape[1] + few["input_ids"].shape[1]
        # eagerly: compiled, these few rows without gradients would be graphs of their own that training
        # never reuses (71-81 s of cold compiling before a stage's first step on the H100, session 33)
        with torch.no_grad(), autocast, uncompiled():
            ordinary = float(model(**ordinary_inputs(model, **few)).loss)
            shared = float(shared_prefix_loss(model, position_ids=self.positions(model, total), same_size_images=True,
                                              image_grid=self.train.grid_thw, **few))
        tolerance = (0.02 if self.bf16 else 1e-4) * max(1.0, abs(ordinary))
        if abs(shared - ordinary) <= tolerance:
            log.info("fast path: the shared-prefix loss equals the ordinary forward's on the first batch "
                     "(%.5f vs %.5f)", shared, ordinary)
            return True
        log.warning("fast path: the shared-prefix loss (%.5f) differs from the ordinary forward's (%.5f) on this "
                    "machine: every batch takes the ordinary forward", shared, ordinary)
        return False


def _why_not(cfg, world_size: int) -> str | None:
    if world_size > 1:
        return f"a distributed run ({world_size} processes)"
    if getattr(cfg, "deepspeed", None):
        return "DeepSpeed"
    if cfg.gradient_checkpointing:
        return "gradient_checkpointing"
    return None


def prepare_fast_path(cfg, collator: VLACollator, train_samples: Sequence[Any], eval_samples: Sequence[Any] | None,
                      bf16: bool, world_size: int = 1, place: bool = True) -> FastPath | None:
    """The fast path's data for this run, or None (ordinary path) with one log line saying why.
    ``place=False`` leaves the data in host memory (placed() puts it where training will read it):
    data encoded ahead, while another training holds the GPU, cannot yet know its free memory."""
    choice = str(getattr(cfg, "fast_path", "auto")).lower()
    if choice == "false":
        return None
    reason = _why_not(cfg, world_size)
    if reason is None:
        try:
            fast = _encode(cfg, collator, train_samples, eval_samples, bf16)
            return placed(fast) if place else fast
        except NotEncodable as e:
            reason = str(e)
    if choice == "true":
        raise FastPathUnavailable(f"fast_path=true, but {reason}")
    log.info("ordinary training path: the fast path does not serve %s", reason)
    return None


# What training needs on the GPU beside its data (weights, optimizer state, activations): the larger
# of a quarter of the card and 16 GB. A batch of 256 of the embedded model's shape needs about a
# quarter of batch 1,024's, which trained on an 80 GB H100 beside 3.7 GB of data. Data kept in host
# memory is gathered and copied by the host every step: the embedded base trained at 2,350 samples/s
# that way, where the stages before it, GPU-resident, trained at 5,000-5,400 (H100, session 32,
# benchmarks/results/embedded_build_h100_session32_not_kept.log).
TRAINING_RESERVE_FRACTION = 0.25
TRAINING_RESERVE_MIN_BYTES = 16 * 10**9


def _storage_device(nbytes: int) -> torch.device:
    """The GPU when the encoded data leaves training its reserve of the free memory (or takes at most
    half of it), else host memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an earlier training's cached blocks are free for this one
        free, total = torch.cuda.mem_get_info()
        reserve = max(int(total * TRAINING_RESERVE_FRACTION), TRAINING_RESERVE_MIN_BYTES)
        if nbytes <= free // 2 or nbytes <= free - reserve:
            return torch.device("cuda")
        log.info("encoded data (%.1f GB) kept in host memory: the GPU has %.1f GB free, and training keeps "
                 "%.1f GB of it", nbytes / 1e9, free / 1e9, reserve / 1e9)
    return torch.device("cpu")


def _encode(cfg, collator: VLACollator, train_samples, eval_samples, bf16: bool) -> FastPath:
    """The data encoded into host memory (placed() moves it)."""
    import time

    workers = getattr(cfg, "preprocessing_num_workers", None)
    workers = default_workers() if workers is None else int(workers)
    started = time.perf_counter()
    train = encode_samples(train_samples, collator, workers=workers, device="cpu")
    evaluation = encode_samples(eval_samples, collator, workers=workers, device="cpu") if eval_samples else None
    if evaluation is not None and (evaluation.prefix_length != train.prefix_length
                                   or evaluation.grid_thw != train.grid_thw
                                   or not torch.equal(evaluation.ids[0, :train.prefix_length],
                                                      train.ids[0, :train.prefix_length])):
        raise NotEncodable("the eval data's prompts or frame size differ from the training data's")
    log.info("fast path: %d training%s samples encoded once in %.1f s (%d workers; %.2f GB); the %d prompt tokens "
             "every sample shares are computed once per batch", len(train),
             f" + {len(evaluation)} eval" if evaluation is not None else "", time.perf_counter() - started, workers,
             (train.nbytes + (evaluation.nbytes if evaluation is not None else 0)) / 1e9, train.prefix_length)
    arithmetic = processor_arithmetic(collator.processor.image_processor)
    return _fast_path_on(train, evaluation, arithmetic, torch.device("cpu"), bf16)


def placed(fast: FastPath) -> FastPath:
    """``fast`` with its data where training reads it: on the GPU when it leaves training its reserve
    (_storage_device), else in host memory; batches are built on the GPU when there is one."""
    compute = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    storage = _storage_device(fast.train.nbytes + (fast.eval.nbytes if fast.eval is not None else 0))
    if storage.type == fast.train.frames.device.type and compute == fast.builder.device:
        return fast
    train = fast.train.to(storage)
    evaluation = fast.eval.to(storage) if fast.eval is not None else None
    log.info("fast path: the encoded data is kept on %s", storage.type)
    return _fast_path_on(train, evaluation, fast.builder.arithmetic, compute, fast.bf16)


def _fast_path_on(train: EncodedTensors, evaluation: EncodedTensors | None, arithmetic: ProcessorArithmetic,
                  compute: torch.device, bf16: bool) -> FastPath:
    splits = {"train": train, **({"eval": evaluation} if evaluation is not None else {})}
    return FastPath(train=train, eval=evaluation, builder=BatchBuilder(splits, arithmetic, compute), bf16=bf16)
