"""Initialise backbones from image checkpoints (timm ViT / Swin, ImageNet MAE) read from a local file.

Every conversion from another model's checkpoint lives here; a backbone's `load_pretrained` names the one it
uses. No downloads at run time: `load_state` reads a file the user points at (`timm.create_model(...,
pretrained=True)` once, then `torch.save(model.state_dict(), path)`, or an official release file).
`load_into` copies every tensor it can place and adapts the few whose shape is meant to differ:

- position embeddings: the image grid (14 x 14 at 224^2) is resampled to the stream's grid (2D spectrogram
  grid, or the frames' grid repeated over time for video); class-token entries are dropped;
- patch embeddings: an RGB kernel becomes the 1-channel spectrogram kernel by summing over colour (the
  AST recipe), and kernels are resized when the patch size differs (timm's `resample_patch_embed`);
- a learned position table of another length along time (a checkpoint trained on other audio lengths: `init_from`
  from 5.12 s to 8 s or 2.56 s): resampled along the time axis by value (`resample_pos_embed`, the resampling the
  model applies to a longer input), for the tables the backbone names in `position_tables()`;
- relative-position-bias tables: resized bicubically (timm's `resize_rel_pos_bias_table_simple`, in
  `resize_bias_table`, the one place); Zorro-Swin's streams (`swin_into_streams`: a timm 2D Swin into the
  audio stream and, inflated as Video Swin does, the video stream) crop them for windows clamped to a grid.

Converters name a backbone's input modules (embedding.InputEmbed) in their source's layout (timm names under the
modality's prefix, `audio.patch_embed.*`; CAV-MAE's official `patch_embed_a.*`); `load_into` reads every model key
through `embedding.input_module_key`, the one table of those names, which also serves the suite's older checkpoints
(`upgrade_state_dict`).

Everything else that does not match is reported, never silently dropped: the report lists loaded, resized,
missing (left at their initialisation) and unexpected (not used) keys, each unused key with the reason. A model
tensor that two checkpoint keys would write is an error (no last-write-wins).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from timm.layers import resize_rel_pos_bias_table_simple
from torch import nn

from .embedding import input_module_key
from .layers import resample_pos_embed

Rename = Callable[[str], "str | Iterable[str] | Unused | None"]


@dataclass(frozen=True)
class Unused:
    """What a rename returns for a checkpoint key it deliberately does not load: the reason, for the report."""
    reason: str


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
    reasons: dict[str, str] = field(default_factory=dict)  # unexpected key -> why it is not used
    sources: dict[str, str] = field(default_factory=dict)  # loaded model key -> the checkpoint key it came from

    def unused(self, key: str, reason: str) -> None:
        self.unexpected.append(key)
        self.reasons[key] = reason

    def __str__(self) -> str:
        lines = [f"pretrained weights: {len(self.loaded)} tensors loaded ({len(self.resized)} resized), "
                 f"{len(self.missing)} missing (kept their initialisation), {len(self.unexpected)} unused, "
                 f"{len(self.mismatched)} with shapes that do not fit"]
        lines += [f"  resized   {k}: {tuple(a)} -> {tuple(b)} ({how})" for k, a, b, how in self.resized]
        lines += [f"  mismatch  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        lines += [f"  missing   {k}" for k in _summarise(self.missing)]
        by_reason: dict[str, list[str]] = {}
        for key in self.unexpected:
            by_reason.setdefault(self.reasons.get(key, "no such tensor in the model"), []).append(key)
        for reason, keys in by_reason.items():
            lines += [f"  unused    {k}" for k in _summarise(keys, limit=4)]
            lines[-1] += f"  ({reason})"
        return "\n".join(lines)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, rename: Rename | None = None,
              channels_to_one: Sequence[str] = (), pos_grids: Mapping[str, Sequence[int]] | None = None) -> LoadReport:
    """Copy `state` into `module` (in place) and say what happened.

    rename: checkpoint key -> model key(s) or None to skip (one source may feed several streams); input modules'
        keys may be given in any layout `embedding.input_module_key` knows.
    channels_to_one: model keys of 1-channel patch kernels that take a summed RGB kernel.
    pos_grids: model key of a flattened position embedding -> its grid ((h, w) or (t, h, w)); the
        checkpoint's grid is the largest square its entries hold; the entries in front of it (class / register
        tokens) are dropped.
    """
    target = module.state_dict()
    time_tables = module.position_tables() if hasattr(module, "position_tables") else {}
    report, seen = LoadReport(), set()
    updates: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # model key -> the checkpoint key that wrote it
    for src_key, value in state.items():
        dst = to_model_keys(rename(src_key) if rename else src_key)
        if isinstance(dst, Unused):
            report.unused(src_key, dst.reason)
            continue
        dst_keys = [dst] if isinstance(dst, str) else list(dst or [])
        if not dst_keys or not any(k in target for k in dst_keys):
            report.unused(src_key, f"no tensor {dst_keys[0]} in the model" if dst_keys and dst_keys[0] != src_key
                          else "no such tensor in the model")
            continue
        for key in dst_keys:
            if key not in target:
                report.unused(f"{src_key} -> {key}", "no such tensor in the model")
                continue
            if key in source:
                raise ValueError(f"checkpoint keys {source[key]!r} and {src_key!r} both map to {key!r}: "
                                 "a converter must write each model tensor once")
            source[key] = src_key
            want = target[key]
            adapted, how = _adapt(key, value, want, channels_to_one, (pos_grids or {}).get(key), time_tables.get(key))
            if adapted is None:
                report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
                continue
            updates[key] = adapted.to(want.dtype)
            seen.add(key)
            report.loaded.append(key)
            report.sources[key] = src_key
            if how:
                report.resized.append((key, tuple(value.shape), tuple(want.shape), how))
    module.load_state_dict(updates, strict=False)
    report.missing = [k for k in target if k not in seen and not _is_buffer_only(module, k)]
    return report


def to_model_keys(dst):
    """A rename's answer with every key in the model's names (input modules: `embedding.input_module_key`)."""
    if isinstance(dst, str):
        return input_module_key(dst)
    if dst is None or isinstance(dst, Unused):
        return dst
    return [input_module_key(k) for k in dst]


def upgrade_state_dict(state: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """A state dict of this suite written by an earlier layout -> the current one, for a strict load into a model
    whose state-dict keys are `model_keys` (a backbone's, or a task's with its `backbone.` prefix):

    - input modules' tensors under their earlier names (`audio_pos`, `audio_embed.proj.*`, `audio_fourier.*`,
      MBT's / Swin's `audio.patch_embed.*`, CAV-MAE's `patch_embed_a.*`, ...) take InputEmbed's names
      (`embedding.input_module_key`);
    - the fusion copy of every per-group layer that two_streams with separate weights carried before separate
      weights were built only for the routing's groups, which no step used, is left out.

    Keys the model has pass unchanged; the order of the others is kept. Pure: `state` is not modified."""
    expected = set(model_keys)
    out = {}
    for key, value in state.items():
        new = key if key in expected else input_module_key(key)
        if ".parts.fusion." in new and new not in expected:
            continue
        if new in out:
            raise ValueError(f"state-dict keys {key!r} and another both upgrade to {new!r}")
        out[new] = value
    return out


def reorder_optimizer_state(state: Mapping, old_groups: Sequence[Sequence[str]],
                            new_groups: Sequence[Sequence[str]]) -> dict:
    """An optimizer's state_dict saved while its param groups listed the parameters `old_groups` (names, in the
    saved order) -> the same state for param groups listing `new_groups` (the same groups, names in the current
    order): every parameter's state (e.g. Adam's moments) follows its name. The input modules' tensors moved in the
    parameter order with their names (the root module's parameters come first), so a checkpoint's optimizer state
    is read through this with `old_groups` = each group's names in the checkpoint's state-dict order (upgraded).
    A name in `old_groups` that is in no new group loses its state. Pure: `state` is not modified."""
    if len(old_groups) != len(new_groups) or len(state["param_groups"]) != len(old_groups):
        raise ValueError(f"{len(state['param_groups'])} saved param groups, {len(old_groups)} old and "
                         f"{len(new_groups)} new name lists: they must correspond one to one")
    by_name, index = {}, 0
    for names, group in zip(old_groups, state["param_groups"]):
        if len(names) != len(group["params"]):
            raise ValueError(f"a saved param group has {len(group['params'])} parameters, its names {len(names)}")
        for name, i in zip(names, group["params"]):
            by_name[name] = i
    out = {"state": {}, "param_groups": []}
    for names, group in zip(new_groups, state["param_groups"]):
        params = []
        for name in names:
            if name in by_name and by_name[name] in state["state"]:
                out["state"][index] = state["state"][by_name[name]]
            params.append(index)
            index += 1
        out["param_groups"].append({**group, "params": params})
    return out


def _adapt(key, value, want, channels_to_one, grid, time_table=None):
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
        side = math.isqrt(want.shape[0])
        if side * side != want.shape[0]:
            raise ValueError(f"relative-position-bias tables must be square: {value.shape[0]} -> {want.shape[0]}")
        return resize_bias_table(value, ((side + 1) // 2,) * 2), "relative-position-bias table resized"
    if grid is not None and value.ndim == 3 and want.ndim == 3 and value.shape[-1] == want.shape[-1]:
        side = math.isqrt(value.shape[1])  # class / register tokens sit in front of the grid
        pos = value[:, value.shape[1] - side * side:]
        grid = tuple(grid)
        spatial = resample_pos_embed(pos, (side, side), grid[-2:])
        if len(grid) == 3:  # image positions shared by every frame (temporal positions are learned from zero)
            spatial = spatial.reshape(1, 1, -1, value.shape[-1]).expand(1, grid[0], -1, -1).reshape(1, -1, value.shape[-1])
        if spatial.shape == want.shape:
            return spatial, f"position grid {side}x{side} -> {'x'.join(map(str, grid))}"
    if grid is None and time_table is not None and value.ndim == want.ndim == 3 and value.shape[-1] == want.shape[-1]:
        resampled = _resample_time(value, *time_table)
        if resampled is not None:
            return resampled
    return None, ""


def _resample_time(value: torch.Tensor, grid: Sequence[int], axis: int):
    """A 1 x N x D table of the grid `grid` with another length along `axis` (time) -> (the table resampled to
    `grid`, how), or None when N is not a whole number of time steps."""
    grid = tuple(grid)
    per_step = math.prod(grid) // grid[axis]
    if value.shape[1] % per_step:
        return None
    old = list(grid)
    old[axis] = value.shape[1] // per_step
    return (resample_pos_embed(value, old, grid),
            f"positions resampled along time, {old[axis]} -> {grid[axis]} steps (grid {'x'.join(map(str, grid))})")


def _is_buffer_only(module: nn.Module, key: str) -> bool:
    """Non-persistent-looking buffers (index tables, masks) are rebuilt by the model, not loaded."""
    return key not in dict(module.named_parameters()) and any(
        part in key for part in ("relative_position_index", "attn_mask", "window_mask", "fb", "window"))


def _summarise(keys: list[str], limit: int = 12) -> list[str]:
    return keys if len(keys) <= limit else keys[:limit] + [f"... and {len(keys) - limit} more"]


# -- timm ViT / MAE -> the ViT backbones (key renames for load_into) -------------------------------------------
def vit_into_zorro_vit(*, groups: Sequence[str] | None) -> Rename:
    """timm ViT keys -> Zorro-ViT's: the patch embedding and positions into both modalities (timm's names under the
    modality's prefix, which load_into reads as the input modules'), each block into the shared weights (groups
    None) or, with separate weights, into every group's copy (e.g. audio, fusion, video)."""
    parts = [f"parts.{g}" for g in groups] if groups else ["shared"]

    def rename(key: str):
        if key.startswith("patch_embed.") or key == "pos_embed":
            return [f"{m}.{key}" for m in ("audio", "video")]
        m = re.fullmatch(r"(blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp)|norm)\.(.+)", key)
        return [f"{m[1]}.{p}.{m[2]}" for p in parts] if m else None

    return rename


def vit_into_streams(streams: Sequence[str]) -> Rename:
    """timm ViT keys -> one copy per stream (MBT's `audio.` / `video.` ViTs, timm's names inside; the patch
    embedding and positions are the input modules', see load_into); the classifier parts (head, fc_norm) have no
    counterpart."""

    def rename(key: str):
        if key.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")):
            return [f"{s}.{key}" for s in streams]
        return None

    return rename


def is_cav_mae_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """A checkpoint in the official CAV-MAE layout (github.com/yuangongnd/cav-mae: `blocks_a`, `norm_a`, ...; the
    pre-trained CAVMAE, the fine-tuned CAVMAEFT, the adapted ImageNet initialisation) rather than an image ViT/MAE."""
    return any(k.startswith(("blocks_a.", "blocks_u.", "norm_a.", "modality_a")) for k in state)


def vit_into_cav_mae(state: Mapping[str, torch.Tensor], *, num_modality_blocks: int,
                     patch_size: int) -> tuple[dict[str, torch.Tensor], Rename]:
    """ImageNet MAE / timm ViT -> CAV-MAE, as the official `adapt_vmae_weights.py`: layers below
    `num_modality_blocks` into both modality streams, the rest into E_j (their LayerNorms into all three
    streams), the final `norm` into norm, norm_a and norm_v, the MAE decoder as is (its first p*p output rows
    for audio). A checkpoint already in the CAV-MAE layout is not converted: `cav_mae_rename`."""
    if is_cav_mae_layout(state):
        return dict(state), cav_mae_rename()
    n = num_modality_blocks
    state = dict(state)
    if "decoder_pred.weight" in state:  # image MAE: audio predicts p*p values, its first p*p rows (official)
        state.update({"decoder_pred_a.weight": state["decoder_pred.weight"][: patch_size**2],
                      "decoder_pred_a.bias": state["decoder_pred.bias"][: patch_size**2]})

    def rename(key: str):
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if int(i) < n:
                return [f"blocks_a.{i}.{rest}", f"blocks_v.{i}.{rest}"]
            j = int(i) - n
            if rest.startswith(("norm1.", "norm2.")):
                norm, param = rest.split(".")
                return [f"blocks_u.{j}.{norm}{s}.{param}" for s in ("", "_a", "_v")]
            return f"blocks_u.{j}.{rest}"
        if key.startswith("norm."):
            return [key, key.replace("norm.", "norm_a."), key.replace("norm.", "norm_v.")]
        if key.startswith("patch_embed."):
            return [key.replace("patch_embed.", "patch_embed_a."), key.replace("patch_embed.", "patch_embed_v.")]
        if key.startswith("decoder_pred."):
            return key.replace("decoder_pred.", "decoder_pred_v.")
        if key in ("cls_token", "pos_embed", "decoder_pos_embed"):
            return Unused("CAV-MAE has no class token; its positions are fixed 2-D sin-cos tables")
        return key  # decoder_*, mask_token

    return state, rename


def cav_mae_rename() -> Rename:
    """Official CAV-MAE keys -> ours: the same names (`norm`, `norm_a` and `norm_v` each to its own LayerNorm);
    the fine-tuning head `mlp_head` (LayerNorm + Linear, official CAVMAEFT) -> `head_norm` and the task's
    classifier (CAVMAE.load_official places the Linear). DataParallel's `module.` prefix is removed by
    `load_state`."""

    def rename(key: str):
        if key.startswith("mlp_head.0."):
            return key.replace("mlp_head.0.", "head_norm.")
        return key

    return rename


# -- timm 2D Swin -> Zorro-Swin's streams -----------------------------------------------------------------------
def swin_into_streams(model: nn.Module, state: Mapping[str, torch.Tensor],
                      streams: Sequence[str] = ("audio", "video")) -> dict[str, torch.Tensor]:
    """A timm 2D Swin state dict renamed and fitted onto the Swin streams `streams` of `model` (keys
    `{stream}.{timm key}`), for `load_into`. Keys of other parts (e.g. the ImageNet classifier) pass unchanged
    (reported as unused); the original release's merging at the end of a stage moves to timm's layout."""
    if "layers.0.downsample.reduction.weight" in state:  # original release: merging at the end of a stage
        state = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k): v
                 for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(("patch_embed.", "layers.", "norm.")):
            mapped[key] = value
            continue
        for stream in streams:
            dst = input_module_key(f"{stream}.{key}")
            if dst in target:
                mapped[dst] = _fit_swin(dst, value, model.get_submodule(dst.rsplit(".", 1)[0]), target[dst])
    return mapped


def _fit_swin(key: str, value: torch.Tensor, module: nn.Module, want: torch.Tensor) -> torch.Tensor:
    """Adapt a 2D Swin tensor to the model's tensor `want` where a rule applies (else leave it to load_into):
    bias tables fitted to the window (a 3D window's table repeats the 2D one for every time offset), the 4x4
    patch kernel repeated over the tube's frames and divided by their number (a still video gives the image's
    response)."""
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want.shape[1]:
        window = tuple(module.window_size)
        table = fit_bias_table(value, window[-2:])
        if len(window) == 3:  # inflate: the same spatial bias for every time offset
            table = table.repeat(2 * window[0] - 1, 1)
        return table
    if key == "video_embed.patch.proj.weight" and value.ndim == 4 and want.ndim == 5:
        frames = want.shape[2]
        return value.unsqueeze(2).expand(-1, -1, frames, -1, -1) / frames
    return value


def fit_bias_table(table: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """A square (2S-1)^2 x heads relative-position-bias table -> (2h-1)(2w-1) x heads for an h x w window:
    resized bicubically (timm) where the window is larger than S, then cropped around offset 0 where it is
    smaller (a window clamped to a small grid keeps the pretrained offsets)."""
    old = (math.isqrt(table.shape[0]) + 1) // 2
    big = tuple(max(w, old) for w in window)
    table = resize_bias_table(table, big)
    grid = table.T.reshape(table.shape[1], 2 * big[0] - 1, 2 * big[1] - 1)
    sizes = [2 * w - 1 for w in window]
    top, left = [(n - s) // 2 for n, s in zip(grid.shape[-2:], sizes)]
    return grid[:, top: top + sizes[0], left: left + sizes[1]].reshape(table.shape[1], -1).T.contiguous()


def resize_bias_table(table: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """A square (2S-1)^2 x heads relative-position-bias table resized bicubically to an h x w window:
    (2h-1)(2w-1) x heads (timm's `resize_rel_pos_bias_table_simple`, in float32)."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"expected a square 2D relative-position-bias table, got {table.shape[0]} rows")
    shape = ((2 * window[0] - 1) * (2 * window[1] - 1), table.shape[1])
    if tuple(shape) == tuple(table.shape):
        return table
    return resize_rel_pos_bias_table_simple(table.float(), tuple(window), shape).to(table.dtype)
