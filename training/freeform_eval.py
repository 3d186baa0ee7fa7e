"""`vla-eval` on free-form datasets: generate each sample's last answer and score it like LLaMA-Factory.

The node never serves free-form answers, so these are generated the way training encoded them: the
sample's own conversation up to its last user turn (its own system prompt; earlier assistant turns
are context), rendered by the checkpoint's chat template through training.collate.VLACollator, the
images fitted to the adapter's pixel limits; greedy decoding. The target is the last assistant
answer. Output per run, in LLaMA-Factory's `do_predict` form (training.nlg_metrics):

    generated_predictions.jsonl   {"prompt": ..., "predict": ..., "label": ...} per sample
    predict_results.json          predict_bleu-4, predict_rouge-1/2/l, predict_runtime, ...
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from training.nlg_metrics import predict_results, sample_scores

log = logging.getLogger("vla_eval")

__all__ = ["FreeFormModel", "check_samples", "run_predictions", "write_predictions"]


def check_samples(samples) -> None:
    """Raise ValueError (naming file:line) for a sample that cannot be scored; runs before any model
    loads. The reader has already checked roles (ending with an answer), tags against images, images."""
    for s in samples:
        if not any(m["role"] == "user" for m in s.messages):
            raise ValueError(f"{s.source}: no user turn before the answer to score")


@dataclass
class Prediction:
    prompt: str
    predict: str
    label: str
    source: str


class FreeFormModel:
    """A base checkpoint (+ one LoRA adapter) that generates answers to ShareGPT samples."""

    def __init__(self, model_dir: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from training.collate import VLACollator, pixel_limits_of, set_pixel_limits
        from vla_node.backends.transformers_backend import pick_device, pick_dtype
        from vla_node.image import PixelLimits
        from vla_node.manifest import check_adapter_against_base, has_manifest, read_manifest
        from vla_node.prompt import PromptBuilder
        from vla_node.vocabulary import Vocabulary

        chosen = pick_device(device, torch)  # as the node's backend chooses: BackendError names a bad one
        torch_dtype = pick_dtype(dtype, chosen, torch)
        self.device = str(chosen)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        limits = pixel_limits_of(self.processor)
        if adapter and has_manifest(adapter):
            manifest = read_manifest(adapter)
            check_adapter_against_base(manifest, model_dir, require_actions=False)
            limits = PixelLimits(manifest["image"]["min_pixels"], manifest["image"]["max_pixels"], limits.factor)
        set_pixel_limits(self.processor, limits)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        self.model = model.to(self.device).eval()
        self.has_adapter = bool(adapter)
        self.collator = VLACollator(self.processor, PromptBuilder(Vocabulary.load(None)), limits)

    def answer(self, sample, max_new_tokens: int, with_adapter: bool = True) -> Prediction:
        """Greedy answer to the sample's last user turn (the encoding training used, minus the target)."""
        import contextlib

        import torch

        from training.collate import IGNORE_INDEX

        chat, label = self.collator.split_chat(sample)
        encoded = self.collator.encode(sample)
        n_prompt = int((encoded["labels"] == IGNORE_INDEX).sum())
        total = encoded["input_ids"].shape[0]
        inputs = {}
        for key, value in encoded.items():
            if key == "labels":
                continue
            value = value[:n_prompt] if value.dim() == 1 and value.shape[0] == total else value
            inputs[key] = (value.unsqueeze(0) if value.dim() == 1 and value.shape[0] == n_prompt else value).to(
                self.device)
        off = self.model.disable_adapter() if self.has_adapter and not with_adapter else contextlib.nullcontext()
        with torch.inference_mode(), off:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = self.processor.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
        return Prediction(self.collator.prompt_text(chat), text, label, sample.source)


def run_predictions(model: FreeFormModel, samples, max_new_tokens: int, with_adapter: bool = True
                    ) -> tuple[list[Prediction], dict]:
    """Every sample's prediction, and LLaMA-Factory's predict_results for them."""
    started = time.perf_counter()
    predictions = []
    for i, s in enumerate(samples):
        predictions.append(model.answer(s, max_new_tokens, with_adapter))
        if (i + 1) % 20 == 0:
            log.info("%d / %d samples", i + 1, len(samples))
    runtime = time.perf_counter() - started
    scores = [sample_scores(p.predict, p.label) for p in predictions]
    return predictions, predict_results(scores, runtime, len(samples), len(samples))


def write_predictions(folder: Path, predictions: list[Prediction], results: dict) -> None:
    """generated_predictions.jsonl and predict_results.json, as LLaMA-Factory's do_predict writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "generated_predictions.jsonl").open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps({"prompt": p.prompt, "predict": p.predict, "label": p.label}, ensure_ascii=False) + "\n")
    (folder / "predict_results.json").write_text(json.dumps(results, indent=4) + "\n", encoding="utf-8")
