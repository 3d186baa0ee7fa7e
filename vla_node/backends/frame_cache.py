"""Vision-encoder outputs cached per camera frame, for several commands about the same frame.

A robot often gets a burst of commands ("pick the cube", "no, the ball") while the camera image
barely changes; the vision tower's work depends only on the pixels (and, for an adapter that
reaches the vision tower, on the adapter). transformers' ``generate`` accepts pre-computed vision
outputs as ``mm_encoder_outputs``, so the backend encodes a frame once and hands the same outputs
to every generation about it. Outputs are identical with and without the cache
(tests/test_frame_cache.py).

The key is a hash of the fitted RGB frame plus the image grid, the pixel tensor's shape and dtype
and the active adapter: everything that decides the vision tower's input and weights.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import threading

import numpy as np

__all__ = ["VisionCache"]


class VisionCache:
    """LRU of vision outputs keyed by frame content; ``capacity=0`` turns it off."""

    def __init__(self, capacity: int = 2):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[bytes, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._supported: dict[int, bool] = {}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _supports(self, model) -> bool:
        """The model takes ``mm_encoder_outputs`` and has ``get_image_features`` (transformers >= 5)."""
        known = self._supported.get(id(model))
        if known is None:
            encoder = getattr(getattr(model, "model", None), "get_image_features", None)
            try:
                takes = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
            except (TypeError, ValueError):
                takes = False
            known = self._supported[id(model)] = bool(encoder is not None and takes)
        return known

    @staticmethod
    def _key(image: np.ndarray, inputs: dict, adapter_id: str) -> bytes:
        digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
        pixels = inputs["pixel_values"]
        grid = inputs["image_grid_thw"]
        digest.update(repr((image.shape, tuple(pixels.shape), str(pixels.dtype), str(pixels.device),
                            grid.tolist(), adapter_id)).encode())
        return digest.digest()

    def model_inputs(self, model, inputs: dict, image, adapter_id: str = "") -> dict:
        """``inputs`` for ``model.generate`` with ``pixel_values`` replaced by cached vision outputs.

        Returns ``inputs`` unchanged when the cache is off, the image is not an array, or the model
        cannot take pre-computed outputs.
        """
        if (self.capacity == 0 or not isinstance(image, np.ndarray) or "pixel_values" not in inputs
                or "image_grid_thw" not in inputs or not self._supports(model)):
            return inputs
        import torch

        key = self._key(image, inputs, adapter_id)
        with self._lock:
            outputs = self._entries.get(key)
            if outputs is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if outputs is None:
            with torch.inference_mode():
                outputs = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                         return_dict=True)
            with self._lock:
                self.misses += 1
                self._entries[key] = outputs
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        rest = {name: value for name, value in inputs.items() if name != "pixel_values"}
        rest["mm_encoder_outputs"] = {"image": outputs}  # a fresh dict: generate may add to it
        return rest
