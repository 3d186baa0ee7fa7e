"""A Qwen-VL processor's output for one prompt and one image, without the processor's own call.

A camera frame's prompt holds one ``<|image_pad|>`` that the processor expands to one token per
merged patch (1,000-odd for 640x480), then tokenises the whole text, turns a Python list of ids into
a tensor and merges and validates its keyword arguments: on this project's 2-core CPU 13 ms per
command, of which the image processor takes ~4.6 ms and the tokenizer ~2 ms, the rest bookkeeping.
Here the image processor runs alone, and the ids are put together around the pad: the text before
it (the system text and the user turn's opening: the same for every command) is tokenised once and
kept, the text after it (the command) each time, by the fast tokenizer's own encoder. Tokenising
around the pad is tokenising the whole text: a tokenizer splits its text at added tokens such as
``<|image_pad|>`` before anything else, so no token spans one.

The processor stays the reference: ``OneImageInputs`` is used only after its output for a request
equalled the processor's exactly (every key, every value); the backend checks the first request it
can serve, and a mismatch (another processor version, a template without an image pad) turns it
off for good, with a log line.
"""
from __future__ import annotations

import logging

__all__ = ["OneImageInputs"]

log = logging.getLogger(__name__)


class OneImageInputs:
    """Builds ``processor(text=[text], images=[image], return_tensors="pt", images_kwargs=...)``'s
    tensors for a Qwen-VL processor (image pads expanded by the image grid, merge size squared)."""

    HEADS_KEPT = 8  # texts before the pad kept tokenised (a node has one system text per adapter)

    def __init__(self, processor):
        self._processor = processor
        self.verified: bool | None = None  # None: not yet compared with the processor; False: not used
        self._heads: dict[str, list[int]] = {}  # text before the pad -> its ids
        self._pad_is_one_token: bool | None = None  # the pad tokenises to its one id (asked once)

    def _encode(self, text: str) -> list[int]:
        """``text``'s ids as the tokenizer gives them inside a prompt (no special tokens added)."""
        tokenizer = self._processor.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust encoder alone: no BatchEncoding, no tensor conversion
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _head(self, text: str) -> list[int]:
        ids = self._heads.get(text)
        if ids is None:
            if len(self._heads) >= self.HEADS_KEPT:
                self._heads.clear()
            ids = self._heads[text] = self._encode(text)
        return ids

    @property
    def usable(self) -> bool:
        return self.verified is not False

    def __call__(self, text: str, image, images_kwargs: dict) -> dict | None:
        """The inputs, or None where this text is not one image's prompt (the processor then runs)."""
        import torch

        processor = self._processor
        pad = getattr(processor, "image_token", None)
        image_processor = getattr(processor, "image_processor", None)
        merge = getattr(image_processor, "merge_size", None)
        if not pad or merge is None or text.count(pad) != 1:
            return None
        pad_id = processor.tokenizer.convert_tokens_to_ids(pad)
        if self._pad_is_one_token is None:
            self._pad_is_one_token = self._encode(pad) == [pad_id]
        if not self._pad_is_one_token:  # the pad is not one added token: the processor's way
            return None
        image_inputs = image_processor(images=[image], return_tensors="pt", **images_kwargs)
        grid = image_inputs["image_grid_thw"]
        count = int(grid[0].prod()) // int(merge) ** 2
        at = text.index(pad)
        ids = self._head(text[:at]) + [pad_id] * count + self._encode(text[at + len(pad):])
        input_ids = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == pad_id).long(), **image_inputs}

    def check(self, inputs: dict, reference) -> bool:
        """Compare with the processor's output for the same request; remember the verdict."""
        import torch

        keys, reference_keys = set(inputs), set(reference.keys())
        same = keys == reference_keys and all(
            isinstance(inputs[key], torch.Tensor) and isinstance(reference[key], torch.Tensor)
            and inputs[key].shape == reference[key].shape and inputs[key].dtype == reference[key].dtype
            and torch.equal(inputs[key].cpu(), reference[key].cpu()) for key in keys)
        self.verified = same
        if not same:
            differing = sorted(keys ^ reference_keys) or sorted(
                key for key in keys if not torch.equal(inputs[key].cpu(), reference[key].cpu()))
            log.info("inputs built without the processor differ from its own (%s): the processor builds them",
                     ", ".join(differing))
        return same
