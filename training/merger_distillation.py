"""Distil a Qwen3-VL patch merger into one that merges fewer patches per visual token.

A merger of m x m patches reads their m*m*C features at once (``Qwen3VLVisionPatchMerger``: hidden
width C*m^2), so a merger of m' x m' patches (m' dividing m, e.g. 1 of 2) has other shapes and no
tensor of the old one can be copied. The new one learns what the old one answers for the same
region drawn coarser: each of its m' x m' patches repeated as an (m/m') x (m/m') block of the old
group (m' = 1: the old merger's answer for a uniform region of that patch), on real patch features.

Start (folded_init): the old merger on such a repeated group is exactly a merger whose first layer's
columns are the old ones summed over each repeated block (a DeepStack merger's norm over the whole
group is folded into that layer too: the repeated group has the patch's own mean and variance); the
new layer is m^2/m'^2 times narrower, so it keeps the old hidden units that carry most of the
output and folds the others' mean into the output bias. Then Adam fits every new weight (fit), but
the main merger's per-patch norm: applied before the merge, it keeps its shape and its job, and
stays the old one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FitReport:
    """Relative error |new - target| / |target| on held-out patch groups."""

    random_init: float  # a freshly built merger of the new shape (PyTorch's default init), untrained
    before_fit: float  # folded_init's start
    after_fit: float
    steps: int

    def as_dict(self) -> dict:
        return {"random_init": round(self.random_init, 5), "before_fit": round(self.before_fit, 5),
                "after_fit": round(self.after_fit, 5), "steps": self.steps}


def repeated_groups(groups: torch.Tensor, new_merge: int, old_merge: int) -> torch.Tensor:
    """[G, new^2, C] row-major patch groups -> [G, old^2, C]: each patch repeated as an
    (old/new) x (old/new) block of the old merger's group, row-major as the processor orders it."""
    count, _, channels = groups.shape
    ratio = old_merge // new_merge
    grid = groups.reshape(count, new_merge, new_merge, channels)
    grid = grid.repeat_interleave(ratio, dim=1).repeat_interleave(ratio, dim=2)
    return grid.reshape(count, old_merge * old_merge, channels)


@torch.no_grad()
def merger_targets(old: nn.Module, groups: torch.Tensor, new_merge: int, old_merge: int,
                   chunk: int = 4096) -> torch.Tensor:
    """What the old merger answers for each group drawn coarser ([G, out_hidden])."""
    answers = []
    for part in groups.split(chunk):
        patches = repeated_groups(part, new_merge, old_merge)
        answers.append(old(patches.reshape(-1, patches.shape[-1])))  # the merger views old^2 rows at a time
    return torch.cat(answers)


def _first_layer_input(merger: nn.Module, groups: torch.Tensor) -> torch.Tensor:
    """What linear_fc1 reads for [G, merge^2, C] groups (Qwen3VLVisionPatchMerger.forward's first line)."""
    patches = groups.reshape(-1, groups.shape[-1])
    width = merger.linear_fc1.in_features
    return merger.norm(patches.view(-1, width) if merger.use_postshuffle_norm else patches).view(-1, width)


def folded_first_layer(old: nn.Module, new_merge: int, old_merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [H_old, new^2*C], bias [H_old]) of a first layer that, on the new group's normed patches,
    gives the old first layer's pre-activations for the repeated group (float64)."""
    weight, bias = old.linear_fc1.weight.double(), old.linear_fc1.bias.double()
    channels = weight.shape[1] // (old_merge * old_merge)
    if old.use_postshuffle_norm:  # LayerNorm over the repeated group = over the patch group; its affine moves here
        bias = bias + weight @ old.norm.bias.double()
        weight = weight * old.norm.weight.double()[None, :]
    ratio = old_merge // new_merge
    folded = weight.new_zeros(weight.shape[0], new_merge * new_merge * channels)
    for row in range(old_merge):
        for col in range(old_merge):
            source = (row * old_merge + col) * channels
            target = ((row // ratio) * new_merge + col // ratio) * channels
            folded[:, target:target + channels] += weight[:, source:source + channels]
    return folded, bias


@torch.no_grad()
def folded_init(new: nn.Module, old: nn.Module, groups: torch.Tensor, new_merge: int, old_merge: int) -> None:
    """Set ``new`` from ``old`` (module docstring): folded first layer, the hidden units with the largest
    |fc2 column| x RMS activation on ``groups`` kept, the dropped ones' mean activation in fc2's bias."""
    if new.use_postshuffle_norm:  # the fold carries the old norm's affine
        new.norm.weight.fill_(1.0)
        new.norm.bias.zero_()
    else:
        new.norm.load_state_dict(old.norm.state_dict())
    weight, bias = folded_first_layer(old, new_merge, old_merge)
    activations = nn.functional.gelu(_first_layer_input(new, groups).double() @ weight.T + bias)
    out_weight = old.linear_fc2.weight.double()
    importance = out_weight.norm(dim=0) * activations.pow(2).mean(0).sqrt()
    keep = importance.topk(new.linear_fc1.out_features).indices.sort().values
    dropped = torch.ones(weight.shape[0], dtype=torch.bool)
    dropped[keep] = False
    new.linear_fc1.weight.copy_(weight[keep])
    new.linear_fc1.bias.copy_(bias[keep])
    new.linear_fc2.weight.copy_(out_weight[:, keep])
    new.linear_fc2.bias.copy_(old.linear_fc2.bias.double() + out_weight[:, dropped] @ activations[:, dropped].mean(0))


@torch.no_grad()
def relative_error(merger: nn.Module, groups: torch.Tensor, targets: torch.Tensor) -> float:
    answers = merger(groups.reshape(-1, groups.shape[-1]))
    return float((answers - targets).norm() / targets.norm())


def trainable_parameters(merger: nn.Module) -> list[nn.Parameter]:
    """Every weight but a per-patch norm (the main merger's: before the merge, the old one unchanged)."""
    return [p for name, p in merger.named_parameters()
            if merger.use_postshuffle_norm or not name.startswith("norm.")]


def fit(new: nn.Module, groups: torch.Tensor, targets: torch.Tensor, steps: int, seed: int = 0,
        learning_rate: float = 3e-3, batch: int = 2048) -> None:
    """Adam in fp32 on the mean squared error relative to the targets' mean square (cosine-decayed rate)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = trainable_parameters(new)
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    scale = targets.pow(2).mean()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(len(groups), (min(batch, len(groups)),), generator=generator)
        answers = new(groups[rows].reshape(-1, groups.shape[-1]))
        loss = (answers - targets[rows]).pow(2).mean() / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def distil_merger(new: nn.Module, old: nn.Module, train: torch.Tensor, held_out: torch.Tensor, new_merge: int,
                  old_merge: int, steps: int, seed: int = 0) -> FitReport:
    """Fit ``new`` (fp32, any init: it is overwritten) to ``old`` on ``train`` patch groups ([G, new^2, C]);
    the errors are measured on ``held_out`` groups, against an untrained merger too."""
    train_targets = merger_targets(old, train, new_merge, old_merge)
    held_targets = merger_targets(old, held_out, new_merge, old_merge)
    random_init = relative_error(new, held_out, held_targets)  # the caller's freshly built module
    folded_init(new, old, train, new_merge, old_merge)
    before = relative_error(new, held_out, held_targets)
    fit(new, train, train_targets, steps, seed)
    return FitReport(random_init, before, relative_error(new, held_out, held_targets), steps)
