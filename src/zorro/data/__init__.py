"""DataModules (synthetic, WebDataset shards, mixed unimodal) and per-clip transforms."""

from .info import DatasetInfo

__all__ = ["DatasetInfo"]
