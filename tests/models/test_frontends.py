import torch

from zorro.models.frontends import AudioFrontend, VideoFrontend


def test_log_mel_shape_and_int16_equals_float():
    fe = AudioFrontend(sample_rate=48_000, n_mels=128).eval()
    wav = (torch.randn(2, 122_880) * 3000).to(torch.int16)
    x = fe(wav)
    assert x.shape == (2, 1, 128, 256)  # paper: 2.56 s at 48 kHz, 10 ms hop -> 256 frames
    torch.testing.assert_close(x, fe(wav.float() / 32768))


def test_spec_augment_only_in_training():
    torch.manual_seed(0)
    fe = AudioFrontend(sample_rate=16_000, n_mels=64, clip_seconds=1.28)
    wav = torch.randn(4, 20_480)
    fe.eval()
    a, b = fe(wav), fe(wav)
    assert torch.equal(a, b)
    fe.train()
    c = fe(wav)
    assert c.shape == a.shape and not torch.equal(a, c)


def test_frequency_jitter_shifts_whole_spectrogram():
    fe = AudioFrontend(sample_rate=16_000, n_mels=64, freq_mask=0, time_mask=0, freq_jitter=3)
    x = torch.arange(64.0).view(1, 1, 64, 1).expand(8, 1, 64, 5).clone()
    y = fe.augment(x)
    for b in range(8):  # each example moved by one integer shift; vacated bins are 0
        shift = int((y[b, 0, 32, 0] - x[b, 0, 32, 0]).item())
        assert abs(shift) <= 3
        inside = slice(3, 61)
        torch.testing.assert_close(y[b, 0, inside], x[b, 0, inside] + shift)


def test_video_normalisation():
    fe = VideoFrontend()
    x = torch.full((1, 2, 3, 4, 4), 255, dtype=torch.uint8)
    y = fe(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y[0, 0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_spec_augment_masks_whole_bands():
    from zorro.models.frontends import mask_along

    torch.manual_seed(0)
    x = torch.ones(64, 1, 16, 20)
    y = mask_along(x, 6, dim=2)
    for b in range(64):
        rows = (y[b, 0] == 0).all(dim=1)  # masked frequency rows are zero across all time steps
        assert int(rows.sum()) < 6 and torch.equal(y[b, 0][~rows], x[b, 0][~rows])
        idx = rows.nonzero().flatten()
        assert len(idx) == 0 or (idx.diff() == 1).all()  # one contiguous band
    assert (y == 0).any()


def test_log_mel_equals_torchaudio_melspectrogram():
    import torchaudio

    fe = AudioFrontend(sample_rate=48_000, n_mels=128).eval()
    wav = torch.randn(2, 122_880)
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=48_000, n_fft=2048, win_length=1200, hop_length=480,
                                               n_mels=128, window_fn=torch.hann_window, power=2.0)(wav)[..., :256]
    torch.testing.assert_close(fe(wav)[:, 0], ((ref + 1e-6).log() + 4.27) / (2 * 4.57))
