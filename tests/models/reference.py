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


def assert_model_equals_dense_mask_reference(model, audio, video):
    """The model's outputs and parameter gradients (its own attention backend) equal those of the same model run
    with the dense-mask reference attention."""

    def run():
        model.zero_grad()
        out = model(audio=audio, video=video)
        sum(o.square().sum() for o in out.values()).backward()
        return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}

    out, grads = run()
    with use_dense_mask_attention():
        ref, ref_grads = run()
    assert out.keys() == ref.keys() and grads.keys() == ref_grads.keys()
    for k in out:
        torch.testing.assert_close(out[k], ref[k], msg=k)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)
