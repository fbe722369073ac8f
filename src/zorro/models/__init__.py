"""Backbones and their parts: plain nn.Modules, keyword-only constructors, no Hydra or Lightning."""

from .base import AVBackbone
from .embedding import InputEmbed
from .pretrained import upgrade_state_dict
from .cav_mae import CAVMAE, cav_mae_base, cav_mae_tiny
from .mbt import MBT, mbt_base, mbt_tiny
from .routing import GROUPS, MASKINGS, OUTPUTS, Routing, TokenLayout
from .zorro_hip import ZorroHiP, zorro_hip_base, zorro_hip_tiny
from .zorro_swin import ZorroSwin, zorro_swin_base, zorro_swin_tiny
from .zorro_vit import ZorroViT, zorro_vit_base, zorro_vit_tiny

# Named variants, like timm's registry: tests are parametrised over it. Each factory keeps its class and defaults
# readable (`model_class`, `defaults`: models/variants.py); conf/model/<X>.yaml builds <X>_base, <X>_tiny.yaml <X>_tiny.
MODELS = {factory.__name__: factory for factory in (
    zorro_vit_base, zorro_vit_tiny, zorro_swin_base, zorro_swin_tiny, zorro_hip_base, zorro_hip_tiny,
    mbt_base, mbt_tiny, cav_mae_base, cav_mae_tiny)}


def create_model(name: str, **kwargs):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AVBackbone", "InputEmbed", "upgrade_state_dict",
           "GROUPS", "MASKINGS", "OUTPUTS", "MODELS", "Routing", "TokenLayout", "count_parameters",
           "create_model",
           "ZorroViT", "zorro_vit_base", "zorro_vit_tiny", "ZorroSwin", "zorro_swin_base", "zorro_swin_tiny",
           "ZorroHiP", "zorro_hip_base", "zorro_hip_tiny", "MBT", "mbt_base", "mbt_tiny",
           "CAVMAE", "cav_mae_base", "cav_mae_tiny"]
