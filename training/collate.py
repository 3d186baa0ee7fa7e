"""ShareGPT samples -> Qwen-VL model inputs, with labels on the assistant answer only.

The prompt is built exactly as at serving time: the sample's ShareGPT messages go through
``vla_node.prompt.PromptBuilder.chat_from_sharegpt``, the processor's chat template renders
them with ``add_generation_prompt=True`` (the text the robot's backend feeds the model), and the
image goes through ``vla_node.image.fit_to_limits`` (the runtime's resize) before the processor.

Token layout of one encoded sample::

    [ prompt tokens (system, user, <image> expanded to its patches, "<|im_start|>assistant\\n") ]
    [ answer tokens ] [ <|im_end|> ]
      labels: -100 ... -100 | answer ids | im_end id

The answer is tokenised on its own after the prompt, so training sees the same prompt ids as
generation does (no merge across the prompt/answer boundary). Only the LAST assistant turn is a
target; earlier turns (if any) are context.

``VLACollator.encode`` does the work for one sample (run inside DataLoader workers through
``EncodedDataset``); ``VLACollator.__call__`` pads a batch dynamically (right padding) and
concatenates the image patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from vla_node.image import PixelLimits, fit_to_limits, smart_resize
from vla_node.prompt import PromptBuilder

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "VLACollator",
    "EncodedDataset",
    "EncodeError",
    "pixel_limits_of",
    "set_pixel_limits",
    "load_rgb",
    "system_differs",
]

IGNORE_INDEX = -100
# processor outputs that are per-image (concatenated over the batch), not per-token
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class EncodeError(ValueError):
    """A sample that cannot be turned into model inputs (the message names it)."""


# ------------------------------------------------------------------------------------------------
# processor helpers
# ------------------------------------------------------------------------------------------------


def pixel_limits_of(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> PixelLimits:
    """PixelLimits for ``processor`` (Qwen factor = patch_size * merge_size), the given limits
    overriding the processor's own."""
    ip = processor.image_processor
    size = ip.size
    get = (lambda k: getattr(size, k, None)) if not isinstance(size, Mapping) else size.get
    mn = min_pixels if min_pixels is not None else (get("shortest_edge") or getattr(ip, "min_pixels", None))
    mx = max_pixels if max_pixels is not None else (get("longest_edge") or getattr(ip, "max_pixels", None))
    if mn is None or mx is None:
        raise ValueError("cannot tell the processor's pixel limits; set image_min_pixels and image_max_pixels")
    factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
    return PixelLimits(min_pixels=int(mn), max_pixels=int(mx), factor=factor)


def set_pixel_limits(processor, limits: PixelLimits) -> None:
    """Make ``processor`` (and what it saves) use ``limits``, so the processor never re-resizes an
    image that ``fit_to_limits`` already fitted."""
    from transformers.image_utils import SizeDict

    ip = processor.image_processor
    ip.size = SizeDict(shortest_edge=int(limits.min_pixels), longest_edge=int(limits.max_pixels))
    for attr, value in (("min_pixels", limits.min_pixels), ("max_pixels", limits.max_pixels)):
        if hasattr(ip, attr):
            setattr(ip, attr, int(value))


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 HxWx3."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, ValueError) as e:
        raise EncodeError(f"{path}: cannot read image: {e}") from None


def _image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise EncodeError(f"unexpected message content {type(content).__name__}")


def _messages_of(sample: Any) -> list[dict]:
    msgs = sample.get("messages") if isinstance(sample, Mapping) else getattr(sample, "messages", None)
    if not msgs:
        raise EncodeError(f"{_where(sample)}: sample has no messages")
    return list(msgs)


def _images_of(sample: Any) -> list:
    imgs = sample.get("images") if isinstance(sample, Mapping) else getattr(sample, "images", None)
    return list(imgs or [])


def system_differs(sample: Any, prompt: PromptBuilder) -> bool:
    """True when the sample has no system message or one other than the builder's."""
    msgs = _messages_of(sample)
    first = msgs[0]
    role = first.get("role", first.get("from"))
    text = first.get("content", first.get("value"))
    return role != "system" or text != prompt.system_text


def _answer_kind(sample: Any) -> str:
    """"text" for a free-form sample (training.answer_kinds), else "actions" or ""."""
    return (sample.get("answer_kind") if isinstance(sample, Mapping) else getattr(sample, "answer_kind", "")) or ""


def _where(sample: Any) -> str:
    for attr in ("where", "source", "location"):
        v = sample.get(attr) if isinstance(sample, Mapping) else getattr(sample, attr, None)
        if v:
            return str(v)
    return "sample"


# ------------------------------------------------------------------------------------------------
# collator
# ------------------------------------------------------------------------------------------------


@dataclass
class VLACollator:
    processor: Any
    prompt: PromptBuilder
    limits: PixelLimits
    # True: an action sample's system message is always PromptBuilder.system_text (what the robot
    # sends), whatever the dataset carries; False: keep the dataset's system message (LLaMA-Factory
    # behaviour). Free-form samples (answer_kind "text") always keep theirs.
    builder_system: bool = True
    # LLaMA-Factory's cutoff_len: longest sequence in tokens; a longer answer is cut (its end-of-turn
    # kept), a prompt that alone is that long is an EncodeError. None: no limit.
    cutoff_len: int | None = None

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.tokenizer = tok
        self.im_end = "<|im_end|>"
        self.im_end_id = tok.convert_tokens_to_ids(self.im_end)
        if self.im_end_id is None or self.im_end_id == tok.unk_token_id:
            raise ValueError("the tokenizer has no <|im_end|> token (not a Qwen chat tokenizer?)")
        pad = tok.pad_token_id
        self.pad_id = pad if pad is not None else tok.convert_tokens_to_ids("<|endoftext|>")

    # -- one sample -------------------------------------------------------------------------------
    def split_chat(self, sample: Any) -> tuple[list[dict], str]:
        """(chat messages up to the last user turn, target answer text)."""
        chat = self.prompt.chat_from_sharegpt(_messages_of(sample))
        if self.builder_system and _answer_kind(sample) != "text":
            system = {"role": "system", "content": [{"type": "text", "text": self.prompt.system_text}]}
            chat = [system] + (chat[1:] if chat and chat[0].get("role") == "system" else chat)
        if not chat or chat[-1].get("role") != "assistant":
            raise EncodeError(f"{_where(sample)}: the last message must be the assistant's answer")
        answer = _text_of(chat[-1]["content"])
        if not answer.strip():
            raise EncodeError(f"{_where(sample)}: empty assistant answer")
        return chat[:-1], answer

    def prompt_text(self, chat: list[dict]) -> str:
        return self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def target_text(self, chat: list[dict], answer: str, prompt: str | None = None) -> str:
        """What follows the generation prompt in the template, cut after the first <|im_end|>:
        normally ``answer + "<|im_end|>"``. ``prompt``: prompt_text(chat), where the caller has it."""
        prompt = self.prompt_text(chat) if prompt is None else prompt
        full = self.processor.apply_chat_template(
            chat + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
        )
        if full.startswith(prompt):
            rest = full[len(prompt):]
            end = rest.find(self.im_end)
            if end >= 0 and answer in rest[:end]:
                return rest[: end + len(self.im_end)]
        return answer + self.im_end  # template without the usual shape: answer + end-of-turn

    def answer_ids(self, target: str, prompt_length: int, sample: Any) -> list[int]:
        """The answer's token ids, ending in <|im_end|>, cut so prompt + answer fit cutoff_len."""
        target_ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        if not target_ids or target_ids[-1] != self.im_end_id:
            target_ids.append(self.im_end_id)
        if self.cutoff_len is not None and prompt_length + len(target_ids) > self.cutoff_len:
            room = self.cutoff_len - prompt_length
            if room < 2:
                raise EncodeError(f"{_where(sample)}: the prompt alone is {prompt_length} tokens (images "
                                  f"included), cutoff_len is {self.cutoff_len}: raise cutoff_len or lower "
                                  "image_max_pixels")
            target_ids = target_ids[: room - 1] + [self.im_end_id]
        return target_ids

    def encode(self, sample: Any) -> dict[str, torch.Tensor]:
        chat, answer = self.split_chat(sample)
        prompt = self.prompt_text(chat)
        target = self.target_text(chat, answer, prompt)
        images = [fit_to_limits(load_rgb(p) if not isinstance(p, np.ndarray) else p, self.limits)
                  for p in _images_of(sample)]
        n_tags = prompt.count("<|image_pad|>")
        if n_tags != len(images):
            raise EncodeError(f"{_where(sample)}: {n_tags} image placeholder(s) but {len(images)} image(s)")
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = {
                "size": {"shortest_edge": self.limits.min_pixels, "longest_edge": self.limits.max_pixels}
            }
        enc = self.processor(**kwargs)
        prompt_ids = enc["input_ids"][0]
        tgt = torch.tensor(self.answer_ids(target, prompt_ids.shape[0], sample), dtype=torch.long)
        out: dict[str, torch.Tensor] = {
            "input_ids": torch.cat([prompt_ids, tgt]),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), tgt]),
        }
        n_prompt = prompt_ids.shape[0]
        for key, value in enc.items():
            if key == "input_ids" or not isinstance(value, torch.Tensor):
                continue
            if key in _IMAGE_KEYS:
                out[key] = value
            elif value.dim() == 2 and value.shape[1] == n_prompt:  # per-token extras
                fill = 1 if key == "attention_mask" else 0
                out[key] = torch.cat([value[0], torch.full((tgt.shape[0],), fill, dtype=value.dtype)])
            else:
                out[key] = value
        return out

    def estimate_length(self, sample: Any, with_answer: bool = True) -> int:
        """Cheap token count (no image decode) for length grouping; without the answer: the prompt's."""
        try:
            chat, answer = self.split_chat(sample)
            text = self.prompt_text(chat) + (answer if with_answer else "")
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            for p in _images_of(sample):  # <|image_pad|> expands to (h/factor)*(w/factor) tokens
                w, h = _image_size(p) if not isinstance(p, np.ndarray) else (p.shape[1], p.shape[0])
                rh, rw = smart_resize(h, w, self.limits)
                n += (rh // self.limits.factor) * (rw // self.limits.factor) - 1
            return int(n)
        except Exception:  # length is only a hint
            return 0

    # -- a batch ----------------------------------------------------------------------------------
    def __call__(self, batch: Iterable[Any]) -> dict[str, torch.Tensor]:
        items = [b if _is_encoded(b) else self.encode(b) for b in batch]
        if not items:
            raise ValueError("empty batch")
        longest = max(int(it["input_ids"].shape[0]) for it in items)
        out: dict[str, torch.Tensor] = {}
        token_keys = [k for k, v in items[0].items() if k not in _IMAGE_KEYS and v.dim() == 1]
        for key in token_keys:
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            rows = []
            for it in items:
                v = it[key]
                pad = longest - v.shape[0]
                rows.append(torch.cat([v, torch.full((pad,), fill, dtype=v.dtype)]) if pad else v)
            out[key] = torch.stack(rows)
        for key in _IMAGE_KEYS:
            parts = [it[key] for it in items if key in it]
            if parts:
                out[key] = torch.cat(parts, dim=0)
        return out


def _is_encoded(item: Any) -> bool:
    return isinstance(item, Mapping) and isinstance(item.get("input_ids"), torch.Tensor)


class EncodedDataset(torch.utils.data.Dataset):
    """Samples encoded lazily by the collator (so DataLoader workers do the image work), with
    precomputed approximate ``lengths`` for the length-grouped sampler."""

    def __init__(self, samples: Sequence[Any], collator: VLACollator, compute_lengths: bool = True):
        self.samples = list(samples)
        self.collator = collator
        self.lengths = [collator.estimate_length(s) for s in self.samples] if compute_lengths else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.collator.encode(self.samples[i])
