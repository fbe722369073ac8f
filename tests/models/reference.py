"""Dense-mask reference for routed attention: the same routing table as an N x N boolean mask."""

import contextlib

import torch

from zorro.models.layers import RoutedAttention


def dense_mask_attention(self, x, layout, routing):
    B, N, C = x.shape
    q, k, v = self.qkv(x, layout).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~routing.dense_mask(layout).to(x.device), float("-inf"))
    out = scores.softmax(-1) @ v
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C), layout))


@contextlib.contextmanager
def use_dense_mask_attention():
    original = RoutedAttention.forward
    RoutedAttention.forward = dense_mask_attention
    try:
        yield
    finally:
        RoutedAttention.forward = original
