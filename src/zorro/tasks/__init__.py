"""LightningModules. Model-agnostic: they only see the backbone's output dict."""

from ..data.batch import modality_flags
from ..protocol import EVAL_INPUTS
from .base import BaseTask
from .cav_mae import CAVMAEPretrainTask
from .contrastive import ContrastiveTask, nce_loss
from .optim import cosine_with_warmup
from .retrieval import RetrievalTask
from .supervised import SupervisedTask

__all__ = ["EVAL_INPUTS", "BaseTask", "CAVMAEPretrainTask", "ContrastiveTask", "RetrievalTask", "SupervisedTask",
           "cosine_with_warmup", "modality_flags", "nce_loss"]
