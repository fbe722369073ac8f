"""The evaluation protocol, read by the tasks that score a run and by the reports that print it (zorro.eval):
the input settings, the head a Table-3 column reads, and the metric keys.

Metric keys are `<stage>/<inputs>/<head>/<metric>`: stage val / test / probe; inputs one of EVAL_INPUTS (the other
modality zeroed); head an output name (audio, video, fusion, global) or `avg` (the averaged prediction); metric
e.g. top1, mAP. `metric_key` builds one and `parse_metric_key` reads one back."""

from __future__ import annotations

from typing import NamedTuple, Sequence

# Evaluation input settings (Table 3: V / A / A+V): the other modality's input is zeroed, as in the paper.
EVAL_INPUTS = ("audio_video", "audio", "video")
# Where the missing modality is zeroed (section 4.3: "we zero out the missing modality"):
#   normalised: the model input (normalised log-mel / frames) is zero, as the paper's pipeline feeds its
#               models already-normalised inputs: the default;
#   raw:        the raw signal is zero (silence / black frames), which then goes through the front end.
ZERO_INPUTS = ("normalised", "raw")


def own_head(inputs: str, output_names: Sequence[str] | None = None) -> str:
    """The head a Table-3 column reads: V the video head, A the audio head (each sees its modality; Table 3's
    "two streams A 40.1 above Zorro's 39.7" only reads this way), A+V the average of all heads. Backbones
    without that unimodal head (`output_names` lacks it) fall back to the average."""
    unimodal = inputs in ("audio", "video") and (output_names is None or inputs in output_names)
    return inputs if unimodal else "avg"


class MetricKey(NamedTuple):
    stage: str
    inputs: str
    head: str
    metric: str


def metric_key(stage: str, inputs: str, head: str, metric: str) -> str:
    """`<stage>/<inputs>/<head>/<metric>`, e.g. test/audio/audio/top1."""
    return f"{stage}/{inputs}/{head}/{metric}"


def parse_metric_key(key: str) -> MetricKey | None:
    """The parts of a per-setting metric key; None for any other key (test/score, val/loss, test/a2v_R@1)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] not in EVAL_INPUTS:
        return None
    return MetricKey(*parts)
