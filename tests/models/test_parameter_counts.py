"""The full-size configs against the one size the Zorro paper kept for every backbone: its parameter count
(appendix A: ViT 98M, 267M with separate weights, Swin 161M, HiP 136M), within 5%. Built on the meta device
(no memory, no initialisation), so the full sizes take a second."""

import pytest
import torch
from hydra.utils import instantiate

from zorro.models import count_parameters, frontends

from ..conftest import compose_cfg

PAPER = {("zorro_vit", False): 98e6, ("zorro_vit", True): 267e6, ("zorro_swin", None): 161e6,
         ("zorro_hip", None): 136e6}


@pytest.mark.parametrize("model,separate", list(PAPER))
def test_full_size_configs_have_the_papers_parameter_count(model, separate, tmp_path, monkeypatch):
    overrides = [f"model={model}"]
    if separate is not None:
        overrides.append(f"model.separate_weights={str(separate).lower()}")
    cfg = compose_cfg(overrides=overrides, output_dir=tmp_path)
    audio_frontend = frontends.AudioFrontend

    def on_cpu(*args, **kwargs):  # torchaudio's mel filter bank reads its values, which a meta tensor has none of
        with torch.device("cpu"):
            return audio_frontend(*args, **kwargs)

    for module in ("zorro_vit", "zorro_swin", "zorro_hip"):
        monkeypatch.setattr(f"zorro.models.{module}.AudioFrontend", on_cpu)
    with torch.device("meta"):
        backbone = instantiate(cfg.model)
    assert count_parameters(backbone) == pytest.approx(PAPER[model, separate], rel=0.05)
