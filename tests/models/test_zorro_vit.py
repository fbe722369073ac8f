"""What is specific to Zorro-ViT; the registry tests (test_backbones.py) cover outputs, gradients, information flow
per masking, other input sizes, checkpointing and no_weight_decay."""

import pytest
import torch

from zorro.models import count_parameters, create_model, zorro_vit_tiny

from .helpers import inputs

# Paper (appendix A): 98M (ViT-B), 267M with separate weights. Ours, without classifier heads:
BASE_PARAMS = {False: 94.25e6, True: 264.36e6}


@pytest.mark.parametrize("separate", [False, True])
def test_base_parameter_count(separate, no_random_init):
    model = create_model("zorro_vit_base", separate_weights=separate)
    assert count_parameters(model) == pytest.approx(BASE_PARAMS[separate], rel=1e-3)


def test_drop_missing_modality_runs_only_the_present_stream():
    torch.manual_seed(0)
    model = zorro_vit_tiny(missing_modality="drop").eval()
    audio, video = inputs()
    with torch.no_grad():
        audio_only = model(audio=audio)
        full = model(audio=audio, video=video)
    assert set(audio_only) == {"audio", "fusion", "global"}
    torch.testing.assert_close(audio_only["audio"], full["audio"])  # the audio stream never reads video


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown masking"):
        zorro_vit_tiny(masking="vanilla")
    with pytest.raises(ValueError, match="fusion_level"):
        zorro_vit_tiny(fusion_level=9)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        zorro_vit_tiny()(video=torch.zeros(1, 4, 3, 70, 70, dtype=torch.uint8))
