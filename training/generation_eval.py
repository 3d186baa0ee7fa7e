"""Greedy answers of a model in training, batched on its device, scored like vla-eval.

The eval loss says the model is learning; whether it answers right says more. This scores a few
hundred encoded samples (training.encoded_tensors) with transformers' ``generate`` in batches
(left padded, greedy, no grammar), the parser and vla-eval's per-sample scoring, in seconds on
a GPU, so a build can log plan exact match and box IoU@0.5 next to the eval loss at every
evaluation (the learning curve in models/). The node's own path (prefix cache, constrained
decoding, fp32 on a CPU) is what models/METRICS.md reports; this is the quick look.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from training.encoded_tensors import EncodedTensors, ProcessorArithmetic, pixel_values_of

log = logging.getLogger("vla_train")

__all__ = ["GenerationEval", "generation_eval_callback"]


class GenerationEval:
    def __init__(self, encoded: EncodedTensors, arithmetic: ProcessorArithmetic, tokenizer, vocab,
                 frame_size: tuple[int, int], batch_size: int = 256, max_new_tokens: int = 96):
        from vla_node.parser import BoxCodec

        self.encoded, self.arithmetic, self.tokenizer, self.vocab = encoded, arithmetic, tokenizer, vocab
        self.codec = BoxCodec("absolute_resized", frame_size, frame_size)  # frames are model-sized
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        starts = encoded.answer_starts.tolist()
        lengths = encoded.lengths.tolist()
        ids = encoded.ids.cpu()
        self.prompts = [ids[i, :starts[i]].tolist() for i in range(len(starts))]
        self.references = [tokenizer.decode(ids[i, starts[i]:lengths[i]].tolist(), skip_special_tokens=True).strip()
                           for i in range(len(starts))]
        self.reference_steps = [self._steps(text)[0] or [] for text in self.references]  # parsed once

    def _steps(self, text: str):
        from vla_node.parser import ParseError, parse_actions

        try:
            return parse_actions(text, self.vocab, self.codec), True
        except ParseError:
            return None, False

    @torch.no_grad()
    def answers(self, model) -> list[str]:
        """The greedy answer to every encoded prompt, decoded."""
        from training.compile_layers import uncompiled
        from training.shared_prefix import hf_model_of

        with uncompiled():  # every cache length would be a new compile
            return self._answers(hf_model_of(model))

    def _answers(self, hf) -> list[str]:
        device = next(hf.parameters()).device
        image_token = hf.config.image_token_id
        was_training = hf.training
        hf.eval()
        texts = []
        try:
            for start in range(0, len(self.prompts), self.batch_size):
                rows = list(range(start, min(start + self.batch_size, len(self.prompts))))
                longest = max(len(self.prompts[i]) for i in rows)
                ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                    ids[r, longest - len(self.prompts[i]):] = torch.tensor(self.prompts[i])
                    mask[r, longest - len(self.prompts[i]):] = 1
                index = torch.tensor(rows, device=self.encoded.frames.device)
                frames = self.encoded.frames[index].to(device)
                autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" \
                    else contextlib.nullcontext()
                with autocast:
                    # mm_token_type_ids marks the image tokens: without it transformers gives every token a
                    # text position (no M-RoPE grid), not what the model was trained with
                    out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      mm_token_type_ids=(ids == image_token).int().to(device),
                                      pixel_values=pixel_values_of(frames, self.arithmetic),
                                      image_grid_thw=torch.tensor([self.encoded.grid_thw] * len(rows), device=device),
                                      max_new_tokens=self.max_new_tokens, do_sample=False)
                texts += [self.tokenizer.decode(out[r, longest:].tolist(), skip_special_tokens=True).strip()
                          for r in range(len(rows))]
        finally:
            hf.train(was_training)
        return texts

    def __call__(self, model) -> dict[str, Any]:
        from training.evaluate import aggregate, score_sample

        scores = []
        for i, text in enumerate(self.answers(model)):
            pred, ok = self._steps(text)
            scores.append(score_sample(pred, ok, self.reference_steps[i], text, self.references[i]))
        metrics = aggregate(scores, [], [])
        return {k: metrics[k] for k in ("n", "parse_valid_rate", "plan_exact_match", "verb_acc", "object_acc",
                                         "destination_acc", "box_iou50", "clarify_precision", "clarify_recall")}


def generation_eval_callback(evaluator: GenerationEval):
    """A TrainerCallback that adds the greedy-answer metrics (gen_*) to every evaluation's log."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
            if model is None or not state.is_world_process_zero:
                return
            result = evaluator(model)
            log.info("step %d: greedy answers on %d held-out samples: %s", state.global_step, result["n"],
                     ", ".join(f"{k} {v}" for k, v in result.items() if k != "n"))
            entry = {f"gen_{k}": v for k, v in result.items() if v is not None}
            entry["step"] = state.global_step
            state.log_history.append(entry)

    return _Callback()
