"""A Qwen-VL processor's output for one prompt and one image, without the processor's own call.

A camera frame's prompt holds one ``<|image_pad|>`` that the processor expands to one token per
merged patch (1,000-odd for 640x480), then tokenises the whole text, turns a Python list of ids into
a tensor and merges and validates its keyword arguments: on this project's 2-core CPU 13 ms per
command, of which the image processor takes ~4.6 ms and the tokenizer ~2 ms, the rest bookkeeping.
Here the image processor runs alone, the prompt is tokenised with its single pad, and the pad id is
repeated in the tensor.

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

    def __init__(self, processor):
        self._processor = processor
        self.verified: bool | None = None  # None: not yet compared with the processor; False: not used

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
        image_inputs = image_processor(images=[image], return_tensors="pt", **images_kwargs)
        grid = image_inputs["image_grid_thw"]
        count = int(grid[0].prod()) // int(merge) ** 2
        ids = processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
        where = (ids == pad_id).nonzero()
        if where.numel() != 1:  # the pad did not tokenise to its one id
            return None
        at = int(where[0, 0])
        input_ids = torch.cat([ids[:at], ids.new_full((count,), pad_id), ids[at + 1:]]).unsqueeze(0)
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
