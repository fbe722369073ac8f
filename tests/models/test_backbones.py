"""What every registered backbone promises the tasks: the same inputs, the output dict, zero-input absence."""

import pytest
import torch

from zorro.models import MODELS, create_model

from .test_layers import inputs

TINY = sorted(n for n in MODELS if n.endswith("_tiny"))


@pytest.mark.parametrize("name", TINY)
def test_output_dict_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    audio, video = inputs()
    out = model(audio, video)
    assert set(out) == set(model.output_names) and {"audio", "video"} <= set(out)
    for v in out.values():
        assert v.shape == (2, model.output_dim) and torch.isfinite(v).all()
    sum(v.float().sum() for v in out.values()).backward()
    # CAV-MAE's reconstruction decoder only runs in pre-training
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "decoder" not in n.split(".")[0]]
    assert sum(p.grad is not None for p in trained) > 0.9 * len(trained)


@pytest.mark.parametrize("name", TINY)
def test_an_absent_modality_is_a_zero_input(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    audio, video = inputs()
    with torch.no_grad():
        for kwargs, flagged in (((audio, None), dict(has_video=torch.tensor([False, False]))),
                                ((None, video), dict(has_audio=torch.tensor([False, False])))):
            absent, zeroed = model(*kwargs), model(audio, video, **flagged)
            for k in absent:
                torch.testing.assert_close(absent[k], zeroed[k], atol=1e-5, rtol=1e-4)


ZORRO = [(n, m) for n in TINY if hasattr(MODELS[n](), "maskings") for m in ("zorro", "two_streams")]


@pytest.mark.parametrize("name,masking", ZORRO)
def test_zorro_unimodal_outputs_never_see_the_other_modality(name, masking):
    """The perturbation test: a new audio input leaves the video output bitwise unchanged and vice versa;
    the fusion and global outputs see both."""
    torch.manual_seed(0)
    model = create_model(name, masking=masking).eval()
    audio, video = inputs(seed=0)
    audio2, video2 = inputs(seed=1)
    with torch.no_grad():
        base, new_audio, new_video = model(audio, video), model(audio2, video), model(audio, video2)
    assert torch.equal(base["video"], new_audio["video"]) and torch.equal(base["audio"], new_video["audio"])
    assert not torch.equal(base["audio"], new_audio["audio"]) and not torch.equal(base["video"], new_video["video"])
    for joint in ("fusion", "global"):
        if joint in base:
            assert not torch.equal(base[joint], new_audio[joint]) and not torch.equal(base[joint], new_video[joint])
    assert ("fusion" in base) == (masking == "zorro")
