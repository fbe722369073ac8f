"""Zorro: masked multimodal transformers for audio-visual representation learning.

Layers, bottom to top (a module imports only from its own layer or those below it: tests/test_layers.py):
    zorro.errors, zorro.protocol  the suite's errors; the evaluation protocol (input settings, own head, metric keys)
    zorro.models                  plain nn.Modules (no Hydra, no Lightning)
    zorro.data                    LightningDataModules, the batch contract (data/batch.py), device-side transforms
    zorro.checkpoint              reading a checkpoint: upgrade_checkpoint, rebuild_config
    zorro.tasks                   LightningModules that only see a backbone's output dict
    zorro.eval                    tables, reports, the linear probe, predict
    zorro.callbacks, .preemption  Lightning callbacks of a run
    zorro.config                  early one-line config errors
    zorro.run, zorro.xla          what train.py / evaluate.py do
"""

__version__ = "0.1.0"
