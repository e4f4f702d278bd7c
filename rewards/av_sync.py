"""Audio-video synchronisation from the media alone, no learned model.

1. Audio onset envelope: spectral flux of the mono waveform (``torch.stft``, half-wave rectified frame-to-frame
   magnitude increase, summed over frequency), summed into one bin per video frame.
2. Video motion energy: mean absolute difference between consecutive frames (frame ``t`` gets ``|x_t - x_{t-1}|``).
3. Both are z-normalised and cross-correlated (Pearson) at every lag up to ``max_offset_s``; the lag of the peak is
   the estimated offset (positive: the audio lags the video).

Scores per sample: ``av_sync = 1 / (1 + |offset in seconds|)`` (shaped as OmniNFT's DeSync reward), ``av_corr``
(the peak correlation, in [-1, 1]) and ``av_offset_s`` (the signed offset). ``av_sync`` is the training score.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor


def onset_envelope(audio: Tensor, sample_rate: int, fps: float, num_frames: int, n_fft: int = 512) -> Tensor:
    """Spectral-flux onset strength per video frame.

    audio ``[B, channels, S]`` (or ``[B, S]``) -> ``[B, num_frames]``: flux of hop ``n_fft / 4`` summed over the
    samples that fall in each frame's interval ``[t / fps, (t + 1) / fps)``.
    """
    mono = audio.float().mean(1) if audio.dim() == 3 else audio.float()
    hop = n_fft // 4
    spec = torch.stft(mono, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=True,
                      return_complex=True).abs()  # [B, F, T]
    flux = torch.relu(spec[..., 1:] - spec[..., :-1]).sum(1)  # [B, T-1]; hop j+1's onset
    times = torch.arange(1, flux.shape[-1] + 1, dtype=torch.float64) * hop / sample_rate
    bins = torch.clamp((times * fps).floor().long(), max=num_frames)  # index num_frames: past the video's end
    env = torch.zeros(flux.shape[0], num_frames + 1, dtype=flux.dtype)
    env.index_add_(1, bins, flux)
    return env[:, :num_frames]


def motion_energy(video: Tensor) -> Tensor:
    """Frame-difference energy: video ``[B, F, C, H, W]`` -> ``[B, F]`` (frame 0 gets 0)."""
    diff = (video[:, 1:].float() - video[:, :-1].float()).abs().mean(dim=(2, 3, 4))
    return torch.cat([torch.zeros_like(diff[:, :1]), diff], dim=1)


def lagged_correlation(a: Tensor, v: Tensor, max_lag: int) -> Tensor:
    """Pearson correlation of ``a[t + lag]`` with ``v[t]`` over the overlap, for lag in ``[-max_lag, max_lag]``.

    a, v ``[B, F]`` -> ``[B, 2 * max_lag + 1]`` (lag ``-max_lag`` first). A constant overlap correlates 0.
    """
    out = []
    n = a.shape[1]
    for lag in range(-max_lag, max_lag + 1):
        x = a[:, max(lag, 0) : n + min(lag, 0)]
        y = v[:, max(-lag, 0) : n - max(lag, 0)]
        x = x - x.mean(1, keepdim=True)
        y = y - y.mean(1, keepdim=True)
        den = (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
        out.append((x * y).sum(1) / den)
    return torch.stack(out, 1)


def av_sync(media: Mapping, prompts: Sequence[str] = (), max_offset_s: float = 1.0) -> dict[str, Tensor]:
    """Sync scores for ``{"video": [B, F, C, H, W], "audio": [B, ch, S], "sample_rate": int, "fps": float}``."""
    video, audio = media["video"], media["audio"]
    fps, sr = float(media["fps"]), int(media["sample_rate"])
    frames = video.shape[1]
    if frames < 3:
        raise ValueError(f"av_sync needs at least 3 video frames, got {frames}")
    max_lag = max(1, min(frames - 2, round(max_offset_s * fps)))
    corr = lagged_correlation(onset_envelope(audio, sr, fps, frames), motion_energy(video), max_lag)
    peak, idx = corr.max(1)
    offset = (idx - max_lag).double() / fps
    return {"av_sync": (1 / (1 + offset.abs())).float(), "av_corr": peak.float(), "av_offset_s": offset.float()}


def build(max_offset_s: float = 1.0) -> "callable":
    """Registry factory; ``max_offset_s`` bounds the lags searched."""
    if not math.isfinite(max_offset_s) or max_offset_s <= 0:
        raise ValueError(f"av_sync: max_offset_s must be a positive number of seconds, got {max_offset_s}")

    def reward(media, prompts):
        return av_sync(media, prompts, max_offset_s)

    return reward
