"""Warm-start a deeper language model from a trained checkpoint: new decoder layers appended that
change nothing the model answers until training moves them.

    python -m training.deepen --model models/tabletop-tiny --out out/tabletop-tiny-6 --add-layers 2

Why: the embedded model's misses are checks its answer skips (is every thing the command names on
the table, and only once?), decided at the answer's first token by a 4-layer language model;
more layers give that decision more steps. Training a deeper model from scratch took several GPU
sessions; this keeps what the trained one knows.

What: the language model's last ``add_layers`` decoder layers are repeated after it (layer N-k .. N-1
copied to N .. N+k-1, so copies of different layers break the symmetry between the new ones), each
copy with its attention output projection and its MLP down projection zeroed: a new layer adds
nothing to the residual stream, so every logit is the source's. Layer indices 0 .. N-1 stay, so an
adapter trained on the source loads onto the deeper model with its layers where they were (peft
gives the new ones fresh LoRA pairs, B = 0 as vla-train initialises them) and can be trained on
it further (vla-train adapter_name_or_path); the node itself refuses that pair until then, since
the adapter's manifest names the source's config. config.json gets the new num_hidden_layers (and layer_types, when it has them); the
manifest, if any, is kept with a "deepened" note. The result is a base to train further
(build_embedded --base-from DIR --add-layers K does both).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

log = logging.getLogger("deepen")

LAYER_KEY = re.compile(r"^(model\.language_model\.layers\.)(\d+)\.(.+)$")
# the two projections that write a decoder layer's result into the residual stream
RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")


class DeepeningError(ValueError):
    """A checkpoint that cannot be deepened, or a layer count it cannot take."""


def text_config_of(config: dict) -> dict:
    """The language model's part of a config.json (Qwen2/2.5/3-VL: text_config; flat otherwise)."""
    return config.get("text_config", config)


def language_layers(config_path: Path) -> tuple[dict, int]:
    """(config.json, num_hidden_layers of its language model); DeepeningError when unreadable."""
    if not config_path.is_file():
        raise DeepeningError(f"{config_path}: no such file; --model must be a checkpoint folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    layers = text_config_of(config).get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise DeepeningError(f"{config_path}: no num_hidden_layers for the language model")
    return config, layers


def deeper_tensors(tensors: dict, layers: int, add_layers: int) -> dict:
    """``tensors`` with ``add_layers`` zero-effect copies of the last ``add_layers`` decoder layers appended."""
    import torch

    out = dict(tensors)
    for new in range(layers, layers + add_layers):
        source = new - add_layers
        copied = 0
        for key, value in tensors.items():
            match = LAYER_KEY.match(key)
            if not match or int(match.group(2)) != source:
                continue
            rest = match.group(3)
            out[f"{match.group(1)}{new}.{rest}"] = (torch.zeros_like(value) if rest.startswith(RESIDUAL_WRITERS)
                                                    else value.clone())
            copied += 1
        if not copied:
            raise DeepeningError(f"no weights of decoder layer {source} (model.language_model.layers.{source}.*): "
                                 "not a Qwen-VL checkpoint transformers 5 wrote")
    return out


def with_layers(config: dict, layers: int, add_layers: int) -> dict:
    """config.json with the language model ``add_layers`` layers deeper (layer_types repeated like the weights)."""
    data = json.loads(json.dumps(config))
    text = text_config_of(data)
    text["num_hidden_layers"] = layers + add_layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"] + text["layer_types"][layers - add_layers:layers]
    return data


def deepen_language_model(model_dir, out_dir, add_layers: int, overwrite: bool = False) -> Path:
    """Write model_dir with ``add_layers`` more decoder layers to out_dir (module docstring). Returns out_dir."""
    from safetensors.torch import save_file

    from training.derived_checkpoint import carried_files, move_into_place, partial_folder
    from training.weight_shards import load_tensors, shard_weights
    from vla_node import manifest as mf

    source, out = Path(model_dir), Path(out_dir)
    config, layers = language_layers(source / "config.json")
    if not 1 <= add_layers <= layers:
        raise DeepeningError(f"add_layers={add_layers}: between 1 and the model's {layers} layers "
                             "(each new layer repeats one of the last ones)")
    partial = partial_folder(source, out, overwrite, DeepeningError, "deeper")
    partial.mkdir(parents=True)
    for item in carried_files(source):
        shutil.copy2(item, partial / item.name)
    (partial / "config.json").write_text(json.dumps(with_layers(config, layers, add_layers), indent=2) + "\n",
                                         encoding="utf-8")
    save_file(deeper_tensors(load_tensors(source), layers, add_layers), str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    shard_weights(partial)
    if mf.has_manifest(partial):
        data = mf.read_manifest(partial)
        data["deepened"] = {"from": str(source), "from_config_sha256": mf.config_sha256(source),
                            "num_hidden_layers": {"from": layers, "to": layers + add_layers}}
        mf.write_manifest(partial, data)
    move_into_place(partial, out)
    log.info("deepened %s (%d layers) -> %s (%d layers)", source, layers, out, layers + add_layers)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.deepen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint folder to deepen (e.g. models/tabletop-tiny)")
    parser.add_argument("--out", required=True, help="the deeper checkpoint folder to write")
    parser.add_argument("--add-layers", type=int, default=2,
                        help="decoder layers to append, copies of the last ones with zeroed outputs "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        out = deepen_language_model(args.model, args.out, args.add_layers, args.overwrite)
    except DeepeningError as error:
        parser.error(str(error))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
