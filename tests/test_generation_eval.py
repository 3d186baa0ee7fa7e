"""The greedy answers a build logs at every evaluation (training/generation_eval.py) are the answers
transformers' own generate gives for the processor's inputs of the same samples: the same prompt
ids, pixels and M-RoPE positions (the image tokens marked, as the processor marks them), batched
with left padding. The embedded model (trained: its answers follow the command) and the tiny
Qwen3-VL checkpoint with its weights scaled up. CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_train import training_collator

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]

EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "tabletop-tiny"


@pytest.mark.parametrize("family", ["embedded", "qwen3_vl"])
def test_logged_greedy_answers_are_the_processor_paths(family, tiny_checkpoints, synth_dir):
    from transformers import AutoModelForImageTextToText

    from training import sharegpt
    from training.encoded_tensors import encode_samples, processor_arithmetic
    from training.generation_eval import GenerationEval
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    checkpoint = EMBEDDED if family == "embedded" else tiny_checkpoints[family]
    collator = training_collator(checkpoint)
    samples = sharegpt.load_validated(str(synth_dir), "tabletop_train", vocab=vocab)[:6]
    encoded = encode_samples(samples, collator)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if family != "embedded":
        torch.manual_seed(0)
        for p in model.parameters():  # a random init answers nearly the same token everywhere: make it sensitive
            p.data.normal_(0.0, 0.05)
    frame = (int(encoded.frames.shape[2]), int(encoded.frames.shape[1]))
    evaluator = GenerationEval(encoded, processor_arithmetic(collator.processor.image_processor), collator.tokenizer,
                               vocab, frame, batch_size=4, max_new_tokens=12)  # 4 + 2: left padding in both batches
    got = evaluator.answers(model)

    want = []
    for sample in samples:
        inputs = collator.encode(sample)
        start = int((inputs["labels"] != -100).nonzero()[0])
        prompt = {k: inputs[k][:start][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        with torch.no_grad():
            out = model.generate(**prompt, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                 max_new_tokens=12, do_sample=False)
        want.append(collator.tokenizer.decode(out[0, start:].tolist(), skip_special_tokens=True).strip())
    assert got == want
