"""Initialise backbones from image checkpoints (timm ViT / Swin, ImageNet MAE) read from a local file.

No downloads at run time: `load_state` reads a file the user points at (`timm.create_model(...,
pretrained=True)` once, then `torch.save(model.state_dict(), path)`, or an official release file).
`load_into` copies every tensor it can place and adapts the few whose shape is meant to differ:

- position embeddings: the image grid (14 x 14 at 224^2) is resampled to the stream's grid (2D spectrogram
  grid, or the frames' grid repeated over time for video); class-token entries are dropped;
- patch embeddings: an RGB kernel becomes the 1-channel spectrogram kernel by summing over colour (the
  AST recipe), and kernels are resized when the patch size differs (timm's `resample_patch_embed`);
- Swin relative-position-bias tables: resized bicubically to the target window.

Everything else that does not match is reported, never silently dropped: the report lists loaded, resized,
missing (left at their initialisation) and unexpected (not used) keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import resample_pos_embed

Rename = Callable[[str], "str | Iterable[str] | None"]


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .pth/.pt/.bin/.ckpt (torch) or .safetensors; unwraps "model"/"state_dict"/"module"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (give a local file; nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "module"):  # Lightning / MAE / DDP wrappers
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    resized: list[tuple[str, tuple, tuple, str]] = field(default_factory=list)  # key, from, to, how
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # shapes no rule adapts
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pretrained weights: {len(self.loaded)} tensors loaded ({len(self.resized)} resized), "
                 f"{len(self.missing)} missing (kept their initialisation), {len(self.unexpected)} unused, "
                 f"{len(self.mismatched)} with shapes that do not fit"]
        lines += [f"  resized   {k}: {tuple(a)} -> {tuple(b)} ({how})" for k, a, b, how in self.resized]
        lines += [f"  mismatch  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        lines += [f"  missing   {k}" for k in _summarise(self.missing)]
        lines += [f"  unused    {k}" for k in _summarise(self.unexpected)]
        return "\n".join(lines)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, rename: Rename | None = None,
              channels_to_one: Sequence[str] = (), pos_grids: Mapping[str, Sequence[int]] | None = None) -> LoadReport:
    """Copy `state` into `module` (in place) and say what happened.

    rename: checkpoint key -> model key(s) or None to skip (one source may feed several streams).
    channels_to_one: model keys of 1-channel patch kernels that take a summed RGB kernel.
    pos_grids: model key of a flattened position embedding -> its grid ((h, w) or (t, h, w)); the
        checkpoint's grid is the largest square its entries hold; the entries in front of it (class / register
        tokens) are dropped.
    """
    target = module.state_dict()
    report, seen = LoadReport(), set()
    updates: dict[str, torch.Tensor] = {}
    for src_key, value in state.items():
        dst = rename(src_key) if rename else src_key
        dst_keys = [dst] if isinstance(dst, str) else list(dst or [])
        if not dst_keys or not any(k in target for k in dst_keys):
            report.unexpected.append(src_key)
            continue
        for key in dst_keys:
            if key not in target:
                report.unexpected.append(f"{src_key} -> {key}")
                continue
            want = target[key]
            adapted, how = _adapt(key, value, want, channels_to_one, (pos_grids or {}).get(key))
            if adapted is None:
                report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
                continue
            updates[key] = adapted.to(want.dtype)
            seen.add(key)
            report.loaded.append(key)
            if how:
                report.resized.append((key, tuple(value.shape), tuple(want.shape), how))
    module.load_state_dict(updates, strict=False)
    report.missing = [k for k in target if k not in seen and not _is_buffer_only(module, k)]
    return report


def _adapt(key, value, want, channels_to_one, grid):
    if value.shape == want.shape:
        return value, ""
    how = []
    if key in channels_to_one and value.ndim == want.ndim >= 4 and value.shape[1] == 3 and want.shape[1] == 1:
        value, how = value.sum(1, keepdim=True), ["RGB kernel summed to 1 channel"]
    if value.ndim == want.ndim >= 4 and value.shape[:2] == want.shape[:2] and value.shape[2:] != want.shape[2:]:
        if value.ndim == 4:  # 2D patch size differs: timm's pseudo-inverse resampling keeps the patch response
            from timm.layers import resample_patch_embed

            value = resample_patch_embed(value, list(want.shape[2:]))
            how.append("patch kernel resampled")
        elif value.ndim == 5 and value.shape[3:] == want.shape[3:]:  # time extent of a 3D kernel
            value = value.mean(2, keepdim=True).expand_as(want) * value.shape[2] / want.shape[2]
            how.append("kernel re-inflated in time")
    if value.shape == want.shape:
        return value, ", ".join(how)
    if "relative_position_bias_table" in key and value.ndim == want.ndim == 2 and value.shape[1] == want.shape[1]:
        return _resize_bias_table(value, want.shape[0]), "relative-position-bias table resized"
    if grid is not None and value.ndim == 3 and want.ndim == 3 and value.shape[-1] == want.shape[-1]:
        side = math.isqrt(value.shape[1])  # class / register tokens sit in front of the grid
        pos = value[:, value.shape[1] - side * side:]
        grid = tuple(grid)
        spatial = resample_pos_embed(pos, (side, side), grid[-2:])
        if len(grid) == 3:  # image positions shared by every frame (temporal positions are learned from zero)
            spatial = spatial.reshape(1, 1, -1, value.shape[-1]).expand(1, grid[0], -1, -1).reshape(1, -1, value.shape[-1])
        if spatial.shape == want.shape:
            return spatial, f"position grid {side}x{side} -> {'x'.join(map(str, grid))}"
    return None, ""


def _resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    old, new = math.isqrt(table.shape[0]), math.isqrt(rows)
    if old * old != table.shape[0] or new * new != rows:
        raise ValueError(f"relative-position-bias tables must be square: {table.shape[0]} -> {rows}")
    grid = table.T.reshape(1, -1, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, rows).T.to(table.dtype)


def _is_buffer_only(module: nn.Module, key: str) -> bool:
    """Non-persistent-looking buffers (index tables, masks) are rebuilt by the model, not loaded."""
    return key not in dict(module.named_parameters()) and any(
        part in key for part in ("relative_position_index", "attn_mask", "window_mask", "fb", "window"))


def _summarise(keys: list[str], limit: int = 12) -> list[str]:
    return keys if len(keys) <= limit else keys[:limit] + [f"... and {len(keys) - limit} more"]
