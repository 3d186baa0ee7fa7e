"""Warm-start a Qwen3-VL checkpoint with finer visual tokens (a smaller spatial_merge_size) from a trained one.

    python -m training.widen_vision --model models/tabletop-tiny --out out/tabletop-tiny-merge1

Why: the embedded model's 32 px visual tokens (2x2 patches of 16 px) blur look-alike small objects
together (a 25 px purple cylinder beside a blue one); one token per 16 px patch (merge 1: 300 tokens
for a 320x240 frame instead of 70) sees them apart, but training such a model from scratch took
several GPU sessions. Only the patch mergers' shapes depend on the merge (their width is
vision_hidden * merge^2), so everything else the trained model knows carries over.

What: every tensor whose shape the merge leaves alone (patch embedding, position grid, vision
blocks, the whole language model, lm_head) is copied bit for bit; the main merger and each DeepStack
merger are distilled (training.merger_distillation): the new one learns what the old one answers for
a uniform region of each patch, on the vision blocks' own features of rendered tabletop scenes
(training.synth). config.json and the processor configs get the new merge size; the language
model's M-RoPE image positions follow the token grid, so no weight there changes. The manifest is
kept (prompt template, box convention) with a "widened" note: source, merge sizes, fit errors.
The result is a base to train further (build_embedded --base-from DIR --merge-size 1 does both).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("widen_vision")

MERGER_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
VISION_PREFIX = "model.visual."
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
SCENE_SEED = 3_000_000  # + seed: scenes no build trains or tests on (their seeds are < 1,000,000 and 1M, 2M + seed)
SCENE_SIZE = (320, 240)  # the camera frames the embedded model reads
HELD_OUT_FRACTION = 8  # every 8th scene measures the fit, the others train it
DEFAULT_STEPS = 400
DEFAULT_IMAGES = 256


class WideningError(ValueError):
    """A checkpoint that cannot be widened, or a merge size it cannot be widened to."""


def vision_merge_of(model_dir: Path) -> tuple[dict, int]:
    """(config.json, spatial_merge_size) of a Qwen3-VL checkpoint; WideningError for anything else."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise WideningError(f"{path}: no such file; --model must be a Qwen3-VL checkpoint folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "qwen3_vl":
        raise WideningError(f"{path}: model_type is {config.get('model_type')!r}; only a Qwen3-VL checkpoint "
                            "(qwen3_vl, whose mergers training.merger_distillation knows) can be widened")
    return config, int(config["vision_config"]["spatial_merge_size"])


def check_merge_sizes(path: Path, old: int, new: int) -> None:
    if not 1 <= new < old or old % new:
        raise WideningError(f"{path / 'config.json'}: spatial_merge_size is {old}; merge size {new} is not a "
                            f"smaller divisor of it (widening gives finer tokens: e.g. 2 -> 1)")


def with_merge_size(data, merge_size: int):
    """A JSON value with every "merge_size" / "spatial_merge_size" key set to merge_size (any depth)."""
    if isinstance(data, dict):
        return {k: merge_size if k in ("merge_size", "spatial_merge_size") else with_merge_size(v, merge_size)
                for k, v in data.items()}
    if isinstance(data, list):
        return [with_merge_size(v, merge_size) for v in data]
    return data


def write_configs(source: Path, target: Path, merge_size: int) -> None:
    """The source's tokenizer, chat template, generation config and manifest as they are; config.json
    and the processor configs with the new merge size."""
    from training.derived_checkpoint import carried_files

    target.mkdir(parents=True)
    for item in carried_files(source):
        if item.name == "config.json" or item.name in PROCESSOR_CONFIGS:
            data = with_merge_size(json.loads(item.read_text(encoding="utf-8")), merge_size)
            (target / item.name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copy2(item, target / item.name)


def scene_images(count: int, seed: int) -> list:
    """``count`` rendered tabletop scenes (RGB uint8 HxWx3) of SCENE_SIZE."""
    from training.synth import SynthConfig, Synthesizer

    synthesizer = Synthesizer(SynthConfig(num=count, seed=SCENE_SEED + seed, size=SCENE_SIZE))
    return [synthesizer.sample(i).image[..., ::-1].copy() for i in range(count)]  # BGR (cv2) -> RGB


def vision_tower(model_dir: Path, tensors: dict):
    """The Qwen3-VL vision tower of model_dir's config with ``tensors``' vision weights (fp32, eval);
    its mergers keep their fresh init (none of theirs fits this merge size)."""
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    vision = Qwen3VLVisionModel._from_config(AutoConfig.from_pretrained(str(model_dir)).vision_config,
                                             dtype=torch.float32)
    weights = {k[len(VISION_PREFIX):]: v.float() for k, v in tensors.items()
               if k.startswith(VISION_PREFIX) and not k.startswith(MERGER_PREFIXES)}
    missing, unexpected = vision.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(("merger.", "deepstack_merger_list.")) for k in missing):
        raise WideningError(f"{model_dir}: vision weights do not fit its config (missing {missing}, unexpected "
                            f"{unexpected})")
    return vision.eval()


def merger_inputs(vision, image_processor, images: list, batch: int = 16) -> dict[str, list]:
    """Per merger ("merger", "deepstack_merger_list.K"), per image, the hidden states [patches, C] that feed
    it (the last block's output; DeepStack merger K: block deepstack_visual_indexes[K]'s), in the order the
    processor gives the patches (the new merge's groups contiguous)."""
    import torch

    feeds = {"merger": len(vision.blocks) - 1}  # a DeepStack merger may read the last block too
    feeds.update({f"deepstack_merger_list.{k}": block for k, block in enumerate(vision.deepstack_visual_indexes)})
    captured: dict[str, list] = {name: [] for name in feeds}
    hooks = [vision.blocks[block].register_forward_hook(lambda _m, _i, out, name=name: captured[name].append(out))
             for name, block in feeds.items()]
    counts = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                inputs = image_processor(images=images[start:start + batch], return_tensors="pt")
                grid = inputs["image_grid_thw"]
                vision(inputs["pixel_values"].float(), grid_thw=grid)
                counts += grid.prod(-1).tolist()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: list(torch.cat(outs).split(counts)) for name, outs in captured.items()}


def distil_mergers(vision, old_tensors: dict, old_vision_config, features: dict[str, list], old_merge: int,
                   steps: int, seed: int) -> tuple[dict, dict]:
    """Each of ``vision``'s mergers fitted to the old checkpoint's (training.merger_distillation) on every
    HELD_OUT_FRACTION-th image's patches held out: (its tensors by checkpoint name, fp32; FitReport by merger)."""
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    from training.merger_distillation import distil_merger

    new_merge = vision.spatial_merge_size
    tensors, reports = {}, {}
    for name, per_image in features.items():
        new = vision.get_submodule(name)
        old = Qwen3VLVisionPatchMerger(old_vision_config, use_postshuffle_norm=new.use_postshuffle_norm)
        prefix = f"{VISION_PREFIX}{name}."
        old.load_state_dict({k[len(prefix):]: v.float() for k, v in old_tensors.items() if k.startswith(prefix)})
        channels = per_image[0].shape[-1]
        groups = [x.reshape(-1, new_merge * new_merge, channels) for x in per_image]
        held_out = torch.cat(groups[::HELD_OUT_FRACTION])
        train = torch.cat([g for i, g in enumerate(groups) if i % HELD_OUT_FRACTION])
        torch.manual_seed(seed)
        reports[name] = distil_merger(new, old.eval(), train, held_out, new_merge, old_merge, steps, seed)
        log.info("%s: relative error on %d held-out patch groups: untrained %.4f, folded start %.4f, after %d "
                 "steps %.4f", name, len(held_out), reports[name].random_init, reports[name].before_fit, steps,
                 reports[name].after_fit)
        tensors.update({prefix + k: v.detach().clone() for k, v in new.state_dict().items()})
    return tensors, reports


def widen_vision_tokens(model_dir, out_dir, merge_size: int = 1, steps: int = DEFAULT_STEPS, seed: int = 0,
                        images: int = DEFAULT_IMAGES, overwrite: bool = False) -> Path:
    """Write model_dir (a Qwen3-VL checkpoint) with spatial_merge_size ``merge_size`` to out_dir (module
    docstring); the mergers are fitted for ``steps`` Adam steps on ``images`` rendered scenes. Returns out_dir."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor

    from training.derived_checkpoint import move_into_place, partial_folder
    from training.weight_shards import load_tensors, shard_weights

    source, out = Path(model_dir), Path(out_dir)
    _, old_merge = vision_merge_of(source)
    check_merge_sizes(source, old_merge, merge_size)
    if images < HELD_OUT_FRACTION + 1:
        raise WideningError(f"images={images}: at least {HELD_OUT_FRACTION + 1} (every {HELD_OUT_FRACTION}th "
                            "one is held out to measure the fit)")
    partial = partial_folder(source, out, overwrite, WideningError, "widened")
    write_configs(source, partial, merge_size)

    old_tensors = load_tensors(source)
    vision = vision_tower(partial, old_tensors)
    image_processor = AutoProcessor.from_pretrained(str(partial)).image_processor
    features = merger_inputs(vision, image_processor, scene_images(images, seed))
    old_vision_config = AutoConfig.from_pretrained(str(source)).vision_config
    fitted, reports = distil_mergers(vision, old_tensors, old_vision_config, features, old_merge, steps, seed)

    widened = {k: v for k, v in old_tensors.items() if not k.startswith(MERGER_PREFIXES)}  # bit for bit
    stored = next(v.dtype for k, v in old_tensors.items() if k.startswith(MERGER_PREFIXES))
    widened.update({k: v.to(stored).contiguous() for k, v in fitted.items()})
    save_file(widened, str(partial / "model.safetensors"), metadata={"format": "pt"})
    shard_weights(partial)
    note_widening(partial, source, old_merge, merge_size, images, seed, reports)
    move_into_place(partial, out)
    log.info("widened %s (merge %d) -> %s (merge %d)", source, old_merge, out, merge_size)
    return out


def note_widening(folder: Path, source: Path, old_merge: int, new_merge: int, images: int, seed: int,
                  reports: dict) -> None:
    """The copied manifest (if any) with a "widened" note: what it came from and how well the mergers fit."""
    from vla_node import manifest as mf

    if not mf.has_manifest(folder):
        return
    data = mf.read_manifest(folder)
    data["widened"] = {"from": str(source), "from_config_sha256": mf.config_sha256(source),
                       "merge_size": {"from": old_merge, "to": new_merge}, "scenes": images, "seed": seed,
                       "merger_relative_error": {name: r.as_dict() for name, r in reports.items()}}
    mf.write_manifest(folder, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.widen_vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="the Qwen3-VL checkpoint folder to widen (e.g. models/tabletop-tiny)")
    parser.add_argument("--out", required=True, help="the widened checkpoint folder to write")
    parser.add_argument("--merge-size", type=int, default=1,
                        help="patches merged per visual token, per side: a divisor of the model's, smaller "
                             "(default: %(default)s: one token per patch)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="Adam steps fitting each merger (default: %(default)s)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"rendered 320x240 scenes whose patches the mergers are fitted on (every "
                             f"{HELD_OUT_FRACTION}th held out to measure the fit) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="scenes and fit seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        out = widen_vision_tokens(args.model, args.out, args.merge_size, args.steps, args.seed, args.images,
                                  args.overwrite)
    except WideningError as error:
        parser.error(str(error))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
