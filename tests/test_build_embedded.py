"""The embedded model's recipe: the visual merge is one choice that the checkpoint, the data's
input size (the pixels its boxes are written in) and a later adapter-only build all follow."""
from __future__ import annotations

import pytest

from training.build_embedded import MODEL_SIZES, architecture, merge_size_of, synth_config
from training.synth import Synthesizer
from training.tiny_models import build_tiny_checkpoint


@pytest.mark.parametrize("merge", [1, 2])
def test_the_data_is_fitted_to_the_merged_token_size(merge):
    sizes = architecture(merge)
    cfg = synth_config(100, 0, ("en",), sizes)
    factor = sizes["patch_size"] * merge
    assert cfg.factor == factor
    width, height = Synthesizer(cfg, None).model_input_size()
    assert width % factor == 0 and height % factor == 0
    assert width * height <= sizes["max_pixels"]
    assert {k: v for k, v in sizes.items() if k != "merge_size"} == {
        k: v for k, v in MODEL_SIZES.items() if k != "merge_size"}, "only the merge changes"


def test_an_unknown_merge_size_is_refused():
    with pytest.raises(ValueError, match="merge size 3"):
        architecture(3)


def test_an_exported_base_tells_its_merge_size(tmp_path):
    assert merge_size_of(tmp_path / "none") is None
    small = dict(architecture(1), hidden_size=64, intermediate_size=128, num_attention_heads=2, vocab_size=600,
                 vision_hidden_size=32, vision_intermediate_size=64, vision_depth=1, vision_num_heads=2)
    model = build_tiny_checkpoint(tmp_path / "base", family="qwen2_5_vl", vocab_texts=["put the red cube"] * 4,
                                  **small)
    assert merge_size_of(model) == 1
