"""The embedded model reproduces its published held-out metrics (models/METRICS.json).

The same evaluation code as `vla-eval` (prompt builder, backend, parser, policy) runs on the
first `ci_check.limit` held-out samples of each split, re-created from their recipes, for the
base model and base + LoRA; every quality figure must match what was published, up to one
answer per split and run (greedy decoding can flip a near-tie token on another CPU's kernels).
"""
import json
from pathlib import Path

import pytest

from vla_node.factory import EMBEDDED_ADAPTER, EMBEDDED_MODEL

MODELS = Path(__file__).resolve().parents[1] / "models"


def published() -> dict:
    path = MODELS / "METRICS.json"
    if not (MODELS / EMBEDDED_MODEL / "config.json").is_file() or not path.is_file():
        pytest.skip("the embedded model or its METRICS.json is not built: make models")
    return json.loads(path.read_text(encoding="utf-8"))


def test_heldout_recipes_recreate_unseen_samples(tmp_path):
    from training.heldout import materialise_heldout

    published()
    data = materialise_heldout(MODELS / "heldout" / "test_zh.json", tmp_path / "zh", limit=5)
    rows = json.loads((data / "test.json").read_text(encoding="utf-8"))
    assert len(rows) == 5 and all((data / row["images"][0]).is_file() for row in rows)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in row["messages"][-2]["content"]) for row in rows)


def test_a_recipe_redrawn_for_another_input_frame_keeps_its_scenes_and_moves_only_the_boxes(tmp_path):
    """A merge-1 model (16 px tokens) reads a 320x240 frame whole where the recipe's merge-2 frame is
    320x224: the same scenes and commands, the boxes in the model's own pixels."""
    from training.heldout import input_factor, materialise_heldout

    published()
    assert input_factor(MODELS / EMBEDDED_MODEL) == 32  # 16 px patches merged 2x2
    rows = {}
    for factor in (None, 16):
        data = materialise_heldout(MODELS / "heldout" / "test_en.json", tmp_path / str(factor), limit=6, factor=factor)
        rows[factor] = json.loads((data / "test.json").read_text(encoding="utf-8"))
    for recipe, redrawn in zip(rows[None], rows[16]):
        assert recipe["messages"][:-1] == redrawn["messages"][:-1]  # the same command
        assert (tmp_path / "None" / recipe["images"][0]).read_bytes() == (tmp_path / "16" / redrawn["images"][0]).read_bytes()
    boxes = [(r["messages"][-1]["content"], d["messages"][-1]["content"]) for r, d in zip(rows[None], rows[16])
             if "_box=" in r["messages"][-1]["content"]]
    assert boxes and all(recipe != redrawn for recipe, redrawn in boxes)  # y scaled 224 -> 240


def test_embedded_model_reproduces_its_published_metrics():
    from training.embedded_metrics import CI_PHRASING_SETS, REPRODUCED, evaluate_embedded

    summary = published()
    check = summary["ci_check"]
    again = evaluate_embedded(MODELS, limit=check["limit"], write=False, ci_limit=None, phrasing_sets=CI_PHRASING_SETS)
    from training.embedded_metrics import SPLITS

    assert set(SPLITS) <= set(check["splits"])
    for split, runs in check["splits"].items():
        if split in SPLITS:
            assert set(runs) == {"base", "adapter"}, "base and base+LoRA are both evaluated"
        else:  # the hand-written phrasings and the generator's wording of the same scenes
            assert split.startswith("phrasings_") and len(runs) == 1, split
        for run, metrics in runs.items():
            for key in REPRODUCED:
                want, got = metrics[key], again["splits"][split][run][key]
                if isinstance(want, float):  # rates over n answers; BLEU/ROUGE averages over n
                    one_answer = 1.0 / max(1, metrics["n"])
                    assert got == pytest.approx(want, abs=one_answer + 1e-9), f"{split}/{run}/{key}"
                else:
                    assert got == want, f"{split}/{run}/{key}"
    assert (MODELS / EMBEDDED_ADAPTER / "vla_manifest.json").is_file()
