"""LightningModules. Model-agnostic: they only see the backbone's output dict."""

from .base import EVAL_INPUTS, BaseTask, cosine_with_warmup, modality_flags
from .cav_mae import CAVMAEPretrainTask
from .contrastive import ContrastiveTask, nce_loss
from .retrieval import RetrievalTask
from .supervised import SupervisedTask

__all__ = ["EVAL_INPUTS", "BaseTask", "CAVMAEPretrainTask", "ContrastiveTask", "RetrievalTask", "SupervisedTask",
           "cosine_with_warmup", "modality_flags", "nce_loss"]
