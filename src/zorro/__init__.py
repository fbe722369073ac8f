"""Zorro: masked multimodal transformers for audio-visual representation learning.

Layers (each importable without the ones above it):
    zorro.models  plain nn.Modules (no Hydra, no Lightning)
    zorro.tasks   LightningModules that only see a backbone's output dict
    zorro.data    LightningDataModules and device-side transforms
"""

__version__ = "0.1.0"
