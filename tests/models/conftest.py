import pytest
import torch


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses FlexAttention's backward on CPU (its compiled CPU kernel has none); its eager path does have
    one (the reference math over the same block mask), which is what checks our mask_mod and block tables here.
    On CUDA the compiled kernel computes the same function (torch's own tests)."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


@pytest.fixture
def no_random_init(monkeypatch):
    """A parameter count needs no initial values: skip the random init of 100M+ parameters (seconds on a CPU)."""
    for name in ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts the calls of torch.utils.checkpoint.checkpoint (the real one still runs): proof that activation
    checkpointing happens, not just that the results are right."""
    import torch.utils.checkpoint as ckpt

    calls, real = [], ckpt.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    return calls
