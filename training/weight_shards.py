"""A checkpoint's weights as transformers' safetensors shards, small enough to commit, and back."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["shard_weights", "load_tensors"]


def shard_weights(folder: Path, max_bytes: int = 20_000_000) -> None:
    """model.safetensors as transformers' shards of at most max_bytes (+ model.safetensors.index.json):
    a committed file stays under the repository's 25 MB per file; the tensors are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = folder / "model.safetensors"
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
    tensors = load_file(str(source))
    groups, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return
    weight_map = {}
    for number, group in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, str(folder / shard), metadata=metadata)
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    source.unlink()


def load_tensors(model_dir: Path) -> dict:
    """Every tensor of a safetensors checkpoint (one file or transformers' shards), as stored."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors = {}
    for shard in shards:
        tensors.update(load_file(str(model_dir / shard)))
    return tensors
