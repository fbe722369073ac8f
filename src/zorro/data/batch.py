"""The batch contract (DESIGN.md "The batch contract"): what a loader's batch is, and how it becomes a model's input.

A batch is a dict. Tensors travel to the device in their compact form and become model inputs there:

    video              B x T x 3 x H x W uint8 (or `frames`: data.device.EncodedFrames, decoded on the device);
                       all-zero, or absent, where the modality is missing
    audio              B x S int16 or float waveform (float in [-1, 1] once on the device)
    label              B int64 (single-label) or B x C float (multi-hot); absent for unlabelled data
    has_audio/has_video  B bool: which modalities are real in each sample
    key                list of str: the clip's id (a clip's views share it, and evaluation averages over them)

A task applies it in three steps, once per batch: `mark_absent` on the host (before the transfer: the flags filled
in, a modality no sample has left out as None), the frames decoded on the device (data.device), then `float_audio`.
`model_inputs` turns a prepared batch into a backbone's keyword arguments for one evaluation input setting
(zorro.protocol.EVAL_INPUTS), the other modality zeroed where the setting leaves it out."""

from __future__ import annotations

import torch

from ..protocol import EVAL_INPUTS, ZERO_INPUTS
from .device import EncodedFrames


def num_samples(batch: dict) -> int:
    """The batch's size: its keys, else its first tensor's rows (Lightning's `batch_size` for self.log)."""
    if "key" in batch:
        return len(batch["key"])
    return next(len(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, EncodedFrames))


def presence(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_audio, has_video), B bool: the batch's flags; where the loader sent none, True for a modality it sent
    (a tensor, or the encoded frames) and False for one it did not."""
    sent = {"audio": batch.get("audio") is not None,
            "video": batch.get("video") is not None or batch.get("frames") is not None}
    ref = next((v for v in batch.values() if torch.is_tensor(v)), None)
    device = ref.device if ref is not None else None
    return tuple(batch[f"has_{m}"].bool() if batch.get(f"has_{m}") is not None else
                 torch.full((num_samples(batch),), sent[m], dtype=torch.bool, device=device)
                 for m in ("audio", "video"))


def mark_absent(batch):
    """The first step, on the host (a task's on_before_batch_transfer): has_audio/has_video filled in, and a
    modality that no sample of the batch has set to None (never both). The loaders send zero-filled tensors for a
    missing modality; None is what a backbone's `missing_modality: drop` leaves out of the sequence, and with
    `zeros` it is the same zero input. Deciding it here reads the flags without a device sync, and the zeros are
    never copied to the device."""
    if not isinstance(batch, dict) or not any(batch.get(k) is not None for k in ("audio", "video", "frames")):
        return batch
    batch = dict(batch)
    batch["has_audio"], batch["has_video"] = presence(batch)
    absent = [m for m in ("audio", "video") if not batch[f"has_{m}"].any()]
    if len(absent) == 1:
        batch[absent[0]] = None
        if absent[0] == "video":
            batch.pop("frames", None)
    return batch


def float_audio(batch):
    """The last step, on the device: int16 audio as float in [-1, 1], the scale every front end reads floats
    in, so mixing, zeroing and the front ends see one convention."""
    if isinstance(batch, dict) and batch.get("audio") is not None and batch["audio"].dtype == torch.int16:
        batch = {**batch, "audio": batch["audio"].float() / 32768.0}
    return batch


def modality_flags(batch: dict, inputs: str = "audio_video") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample has_audio / has_video for `inputs` (the other modality's flags off for "audio" / "video")."""
    if inputs not in EVAL_INPUTS:
        raise ValueError(f"inputs must be one of {EVAL_INPUTS}, got {inputs!r}")
    has_audio, has_video = presence(batch)
    if inputs == "audio":
        has_video = torch.zeros_like(has_video)
    elif inputs == "video":
        has_audio = torch.zeros_like(has_audio)
    return has_audio, has_video


def model_inputs(batch: dict, inputs: str = "audio_video", zero_input: str = "normalised") -> dict:
    """The backbone's keyword arguments for an input setting: audio, video, has_audio, has_video."""
    if zero_input not in ZERO_INPUTS:
        raise ValueError(f"zero_input must be one of {ZERO_INPUTS}, got {zero_input!r}")
    audio, video = batch.get("audio"), batch.get("video")
    if zero_input == "raw" and inputs != "audio_video":
        has_audio, has_video = modality_flags(batch)  # silence / black frames count as a present input
        if inputs == "audio" and video is not None:
            video = torch.zeros_like(video)
        if inputs == "video" and audio is not None:
            audio = torch.zeros_like(audio)
    else:
        has_audio, has_video = modality_flags(batch, inputs)
    return {"audio": audio, "video": video, "has_audio": has_audio, "has_video": has_video}
