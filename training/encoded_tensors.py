"""A dataset encoded once into tensors: token ids, answer starts and the fitted camera frames.

The ordinary path (training.collate) encodes every sample again in every epoch: decode the PNG,
fit it, run the processor, tokenise the prompt. For a small model that work, done by CPU workers,
is what the GPU waits for. Here every sample is encoded once, in parallel worker processes, into

    ids            [N, longest] int32   the prompt and answer tokens (right padded)
    lengths        [N] int32            real tokens per sample
    answer_starts  [N] int32            index of the first answer token (labels start there)
    frames         [N, H, W, 3] uint8   the image after vla_node.image.fit_to_limits (the runtime's resize)

which then live on the training device. A batch is a few gathers plus the processor's own
arithmetic on the frames (rescale, normalise, patchify: ``pixel_values_of``), no host work.

Only datasets of the shape the fast path serves are encoded: one image per sample, every image
fitting to the same size, every prompt starting with the same tokens up to the image (the
system prompt and the user turn's opening: ``prefix_length``). ``encode_samples`` says why
otherwise (``NotEncodable``) and the caller falls back to the ordinary path.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from training.collate import EncodeError, VLACollator, _images_of, load_rgb
from vla_node.image import fit_to_limits

log = logging.getLogger(__name__)

__all__ = ["EncodedTensors", "NotEncodable", "EncodeStalled", "encode_samples", "pixel_values_of",
           "processor_arithmetic"]

CHUNK = 256  # samples a worker encodes per task
# A chunk takes a worker about a second; none finishing in this long means a worker died (a killed
# process's task is lost and multiprocessing.Pool would wait for it forever) or hangs.
ENCODE_STALL_S = 120.0


class NotEncodable(Exception):
    """The dataset does not have the shape the fast path serves (the message says what differs)."""


class EncodeStalled(RuntimeError):
    """The encoding workers stopped making progress (the message says what is known)."""


@dataclass
class EncodedTensors:
    ids: torch.Tensor
    lengths: torch.Tensor
    answer_starts: torch.Tensor
    frames: torch.Tensor
    prefix_length: int
    grid_thw: tuple[int, int, int]  # the processor's image_grid_thw row of every frame

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def to(self, device) -> "EncodedTensors":
        return EncodedTensors(self.ids.to(device), self.lengths.to(device), self.answer_starts.to(device),
                              self.frames.to(device), self.prefix_length, self.grid_thw)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.lengths, self.answer_starts, self.frames))


# ------------------------------------------------------------------------------------------------
# encoding one sample (runs in worker processes)
# ------------------------------------------------------------------------------------------------

# What forked workers inherit: the collator, the samples, the shared frames, and the token ids of
# the prompt text before the image per distinct text (one call's tokenizer: cleared with the rest).
_WORK: dict[str, Any] = {}
# one encoding at a time fills _WORK: a build encodes the next training's data in a thread of its own
_ENCODING = threading.Lock()


def _tokens_of(collator: VLACollator, sample: Any, image_tokens: int) -> tuple[list[int], int]:
    """(prompt + answer ids, index of the first answer id): the ids VLACollator.encode makes,
    built without the processor's image work (its one <|image_pad|> repeated image_tokens times)."""
    chat, answer = collator.split_chat(sample)
    prompt = collator.prompt_text(chat)
    target = collator.target_text(chat, answer, prompt)
    if prompt.count("<|image_pad|>") != 1:
        raise NotEncodable("a prompt without exactly one image")
    tok = collator.tokenizer
    head, tail = prompt.split("<|image_pad|>")
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    heads = _WORK["heads"]
    head_ids = heads.get(head)
    if head_ids is None:  # the system prompt and the user turn's opening: the same in most samples
        head_ids = heads[head] = tok(head, add_special_tokens=False)["input_ids"]
    prompt_ids = list(head_ids) + [pad_id] * image_tokens + tok(tail, add_special_tokens=False)["input_ids"]
    try:
        target_ids = collator.answer_ids(target, len(prompt_ids), sample)
    except EncodeError as error:  # the ordinary path reports it
        raise NotEncodable(str(error)) from None
    return prompt_ids + target_ids, len(prompt_ids)


def _fitted(collator: VLACollator, image: Any) -> np.ndarray:
    """The image (an array or a file) fitted to the model's pixel limits, as VLACollator.encode fits it."""
    return fit_to_limits(image if isinstance(image, np.ndarray) else load_rgb(image), collator.limits)


def _encode_one(index: int) -> tuple[int, np.ndarray, int]:
    collator, samples, frames = _WORK["collator"], _WORK["samples"], _WORK["frames"]
    sample = samples[index]
    images = _images_of(sample)
    if len(images) != 1:
        raise NotEncodable(f"sample {index} has {len(images)} images (the fast path serves one per sample)")
    rgb = _fitted(collator, images[0])
    if tuple(rgb.shape) != tuple(frames.shape[1:]):
        raise NotEncodable(f"images of different sizes ({rgb.shape[1]}x{rgb.shape[0]} and "
                           f"{frames.shape[2]}x{frames.shape[1]} after fitting)")
    frames[index] = rgb
    ids, answer_start = _tokens_of(collator, sample, _WORK["image_tokens"])
    return index, np.asarray(ids, dtype=np.int32), answer_start


def _encode_chunk(indices: Sequence[int]) -> list[tuple[int, np.ndarray, int]] | str:
    try:
        return [_encode_one(i) for i in indices]
    except NotEncodable as e:  # crosses the process boundary as text
        return str(e)


# ------------------------------------------------------------------------------------------------
# the whole dataset
# ------------------------------------------------------------------------------------------------


def _frame_shape(collator: VLACollator, sample: Any) -> tuple[int, int]:
    images = _images_of(sample)
    if len(images) != 1:
        raise NotEncodable(f"a sample with {len(images)} images (the fast path serves one per sample)")
    rgb = _fitted(collator, images[0])
    return rgb.shape[0], rgb.shape[1]


def encode_samples(samples: Sequence[Any], collator: VLACollator, workers: int = 0,
                   device: torch.device | str = "cpu") -> EncodedTensors:
    """Encode every sample (``workers`` forked processes; 0 = in this process) into tensors on
    ``device``. Raises NotEncodable. Encodings in several threads run one after the other."""
    if not samples:
        raise NotEncodable("no samples")
    with _ENCODING:
        return _encode_samples(samples, collator, workers, device)


def _encode_samples(samples: Sequence[Any], collator: VLACollator, workers: int,
                    device: torch.device | str) -> EncodedTensors:
    processor = collator.processor.image_processor
    patch, merge = int(processor.patch_size), int(processor.merge_size)
    height, width = _frame_shape(collator, samples[0])
    grid = (1, height // patch, width // patch)
    chunks = [range(i, min(i + CHUNK, len(samples))) for i in range(0, len(samples), CHUNK)]
    parallel = workers > 0 and len(chunks) > 1
    shape = (len(samples), height, width, 3)
    # Forked workers write the frames in place into a file mapping (MAP_SHARED): tens of GB would
    # not cross the pool's pipes quickly. It goes to the temporary folder, or to memory where that
    # disk lacks room (scratch_folder).
    frame_bytes, temporary = int(np.prod(shape)), tempfile.gettempdir()
    scratch = scratch_folder(frame_bytes) if parallel else None
    if scratch is not None and scratch != temporary:
        log.info("fast path: the encoding workers' frames (%s) go to %s: %s lacks room", _size(frame_bytes), scratch,
                 temporary)
    spill = tempfile.TemporaryDirectory(prefix="vla_frames_", dir=scratch) if parallel else None
    frames = (np.lib.format.open_memmap(os.path.join(spill.name, "frames.npy"), mode="w+", dtype=np.uint8,
                                        shape=shape) if spill else np.empty(shape, dtype=np.uint8))
    _WORK.update(collator=collator, samples=samples, frames=frames, image_tokens=grid[1] * grid[2] // merge ** 2,
                 heads={})
    rows: list[tuple[int, np.ndarray, int]] = []
    try:
        if parallel:
            with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
                parts = pool.imap_unordered(_encode_chunk, chunks)
                for _ in chunks:
                    try:
                        part = parts.next(timeout=ENCODE_STALL_S)
                    except multiprocessing.TimeoutError:
                        pool.terminate()
                        raise EncodeStalled(
                            f"encoding stalled: no chunk of {CHUNK} samples finished in {ENCODE_STALL_S:.0f} s "
                            f"({len(rows)} of {len(samples)} samples encoded): a worker died (killed for memory?) "
                            f"or hangs; preprocessing_num_workers=0 encodes in this process") from None
                    if isinstance(part, str):
                        pool.terminate()
                        raise NotEncodable(part)
                    rows += part
        else:
            for chunk in chunks:
                part = _encode_chunk(chunk)
                if isinstance(part, str):
                    raise NotEncodable(part)
                rows += part
        frames_tensor = torch.empty(shape, dtype=torch.uint8, device=device)
        for start in range(0, shape[0], 4096):  # straight from the mapping, no second host copy
            frames_tensor[start:start + 4096].copy_(torch.from_numpy(np.ascontiguousarray(frames[start:start + 4096])))
    finally:
        _WORK.clear()
        del frames
        if spill is not None:
            spill.cleanup()
    rows.sort(key=lambda row: row[0])
    lengths = [len(ids) for _, ids, _ in rows]
    ids = torch.full((len(rows), max(lengths)), collator.pad_id, dtype=torch.int32)
    for i, (_, row_ids, _) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.from_numpy(row_ids)
    image_token = collator.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prefix_length = _shared_prefix_length(ids, torch.tensor(lengths), image_token)
    return EncodedTensors(
        ids=ids.to(device),
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        answer_starts=torch.tensor([start for _, _, start in rows], dtype=torch.int32, device=device),
        frames=frames_tensor,
        prefix_length=prefix_length,
        grid_thw=grid,
    )


# Where the workers' frame mapping may go when the temporary folder's disk lacks room: memory-backed
# (tmpfs) folders. On the GPU machines the disk had 34 GB free for a 36 GB build's frames, and
# /dev/shm 128 GB of memory.
MEMORY_SCRATCH = ("/dev/shm",)


def scratch_folder(frame_bytes: int, candidates: Sequence[str] | None = None) -> str:
    """The first folder of ``candidates`` (default: the temporary folder, then MEMORY_SCRATCH) with
    room for the workers' frame mapping. A disk that fills while they write kills them (SIGBUS), so
    the room is checked up front; a memory-backed folder's room is also capped by the memory
    available. Raises NotEncodable naming what is needed and what each folder has."""
    if candidates is None:
        candidates = [tempfile.gettempdir(), *(f for f in MEMORY_SCRATCH if os.path.isdir(f))]
    room: dict[str, int] = {}
    for folder in dict.fromkeys(candidates):
        free = shutil.disk_usage(folder).free
        if _memory_backed(folder):
            free = min(free, _memory_available())
        if frame_bytes <= 0.95 * free:
            return folder
        room[folder] = free
    have = ", ".join(f"{_size(free)} free in {folder}" for folder, free in room.items())
    raise NotEncodable(f"data whose frames need {_size(frame_bytes)} of scratch space for the encoding workers, "
                       f"with {have} (point TMPDIR at a larger disk, or set preprocessing_num_workers=0 to keep "
                       f"them in memory)")


def _memory_backed(folder: str) -> bool:
    """Whether ``folder`` lies on a tmpfs / ramfs mount (its files take memory, not disk)."""
    path, kind, depth = os.path.realpath(folder), "", -1
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > depth:
                    kind, depth = fields[2], len(mount)
    except OSError:  # not Linux: no tmpfs fallback is offered there anyway
        return False
    return kind in ("tmpfs", "ramfs")


def _memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _shared_prefix_length(ids: torch.Tensor, lengths: torch.Tensor, image_token: int) -> int:
    """Tokens before the image, identical in every sample; NotEncodable when samples differ there."""
    first_image = (ids == image_token).int().argmax(dim=1)
    if bool((first_image != first_image[0]).any()):
        raise NotEncodable("the prompts differ before the image (another system message?)")
    prefix = int(first_image[0])
    if prefix == 0 or bool((ids[:, :prefix] != ids[:1, :prefix]).any()):
        raise NotEncodable("the prompts differ before the image (another system message?)")
    return prefix


# ------------------------------------------------------------------------------------------------
# frames -> pixel_values, on the training device
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessorArithmetic:
    """What the Qwen image processor does to an already fitted frame, as numbers."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float
    patch: int
    merge: int
    temporal: int


def processor_arithmetic(image_processor) -> ProcessorArithmetic:
    if not (getattr(image_processor, "do_rescale", True) and getattr(image_processor, "do_normalize", True)):
        raise NotEncodable("the image processor does not rescale and normalise (not a Qwen-VL processor?)")
    return ProcessorArithmetic(tuple(float(v) for v in image_processor.image_mean),
                               tuple(float(v) for v in image_processor.image_std),
                               float(image_processor.rescale_factor), int(image_processor.patch_size),
                               int(image_processor.merge_size), int(image_processor.temporal_patch_size))


def pixel_values_of(frames: torch.Tensor, how: ProcessorArithmetic) -> torch.Tensor:
    """uint8 RGB frames [B, H, W, 3] -> the processor's pixel_values [B * patches, 3 * T * p * p]
    (rescale and normalise fused as the processor does, then Qwen's patch order)."""
    mean, std = _normalisation(tuple(how.mean), tuple(how.std), how.rescale, frames.device)
    images = (frames.permute(0, 3, 1, 2).float() - mean[:, None, None]) / std[:, None, None]
    b, c, h, w = images.shape
    p, m, t = how.patch, how.merge, how.temporal
    gh, gw = h // p, w // p
    patches = images.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return patches.reshape(b * gh * gw, c * t * p * p)


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple, std: tuple, rescale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std over the rescale factor, on ``device`` once: a host-to-GPU copy of a new tensor
    waits for everything queued on the GPU, every batch."""
    return (torch.tensor(mean, device=device) / rescale, torch.tensor(std, device=device) / rescale)


def default_workers() -> int:
    return max(0, min(16, (os.cpu_count() or 1) - 1))
