"""One prompt + one image without the processor's call (vla_node/backends/engine/one_image_inputs.py):
the same tensors as the processor for all three families and odd frame sizes, taken by the backend
only after they matched on a real request, and dropped when they do not."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures_models import tiny_image, tiny_messages
from vla_node.backends.base import GenerationRequest
from vla_node.backends.engine.one_image_inputs import OneImageInputs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _processor_and_text(model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return processor, processor.apply_chat_template(tiny_messages(), add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(168, 112), (97, 203), (640, 480)])
def test_inputs_equal_the_processors(tiny_checkpoints, family, size):
    processor, text = _processor_and_text(tiny_checkpoints[family])
    images_kwargs = {"size": {"shortest_edge": 3136, "longest_edge": 200704}}
    image = tiny_image(*size)
    direct = OneImageInputs(processor)
    inputs = direct(text, image, images_kwargs)
    reference = processor(text=[text], images=[image], return_tensors="pt", images_kwargs=images_kwargs)
    assert set(inputs) == set(reference.keys())
    for key, value in reference.items():
        assert torch.equal(inputs[key], value), key
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) > 1, "the pad was expanded"
    assert direct.check(inputs, reference) and direct.usable


def test_the_text_before_the_pad_is_tokenised_once_for_every_command(tiny_model_dir):
    """Commands after the same system text: each equals the processor's inputs, the text before the
    pad was tokenised once (a command with special-token text and odd spacing included)."""
    processor, text = _processor_and_text(tiny_model_dir)
    direct = OneImageInputs(processor)
    image = tiny_image()
    tails = ["", " and then the green one", "  <|vision_end|>x<|im_end|>\n\n weird   spacing"]
    for tail in tails:
        prompt = text + tail
        inputs = direct(prompt, image, {})
        reference = processor(text=[prompt], images=[image], return_tensors="pt")
        for key, value in reference.items():
            assert torch.equal(inputs[key], value), (tail, key)
    assert len(direct._heads) == 1
    head = next(iter(direct._heads))
    assert text.startswith(head) and processor.image_token not in head


def test_prompts_without_one_image_pad_go_to_the_processor(tiny_model_dir):
    processor, text = _processor_and_text(tiny_model_dir)
    direct = OneImageInputs(processor)
    assert direct(text.replace(processor.image_token, ""), tiny_image(), {}) is None
    assert direct(text + processor.image_token, tiny_image(), {}) is None


def test_a_mismatch_turns_it_off(tiny_model_dir):
    processor, text = _processor_and_text(tiny_model_dir)
    direct = OneImageInputs(processor)
    image = tiny_image()
    inputs = direct(text, image, {})
    reference = processor(text=[text], images=[image], return_tensors="pt")
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, 0] += 1
    assert not direct.check(inputs, reference) and not direct.usable
    assert not OneImageInputs(processor).check({k: v for k, v in inputs.items() if k != "mm_token_type_ids"},
                                               reference)


def test_backend_uses_them_after_they_matched_and_answers_the_same(tiny_model_dir):
    """The first request compares with the processor; later ones skip it, with the same answers as
    a backend that always calls the processor."""
    from vla_node.backends.transformers_backend import TransformersBackend

    answers = {}
    for direct in (True, False):
        backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=6)
        if not direct:
            backend.engine.one_image_inputs.verified = False
        calls = []
        processor_call = type(backend.processor).__call__
        type(backend.processor).__call__ = lambda self, *a, **k: (calls.append(1), processor_call(self, *a, **k))[1]
        try:
            answers[direct] = [backend.generate(GenerationRequest(image=tiny_image(168, 112, seed=seed),
                                                                  messages=tiny_messages(), max_new_tokens=6)).text
                               for seed in range(3)]
        finally:
            type(backend.processor).__call__ = processor_call
        assert len(calls) == (1 if direct else 3)
        assert backend.engine.one_image_inputs.verified is (True if direct else False)
        backend.close()
    assert answers[True] == answers[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_image_processing_on_the_gpu_matches_too(tiny_checkpoints, family):
    """On CUDA the image processor runs on the GPU (``device`` in its kwargs): the first request's
    comparison passes there too, so later requests skip the processor's call."""
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="float32", max_new_tokens=4)
    for seed in range(2):
        backend.generate(GenerationRequest(image=tiny_image(168, 112, seed=seed), messages=tiny_messages(),
                                           max_new_tokens=4))
    assert backend.engine._gpu_image_processing and backend.engine.one_image_inputs.verified is True
    backend.close()
