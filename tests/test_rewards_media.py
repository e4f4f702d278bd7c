"""Rewards computed from the media alone: JPEG (in)compressibility and audio-video sync."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.av_sync import av_sync, lagged_correlation, motion_energy, onset_envelope
from rewards.jpeg import build_compressibility, build_incompressibility

FPS, SR, FRAMES = 24.0, 16000, 72


def test_jpeg_size_matches_pil_and_ranks_flat_above_noise():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=g)])
    comp = build_compressibility()(images, ["", ""])["jpeg_compressibility"]
    incomp = build_incompressibility()(images, ["", ""])["jpeg_incompressibility"]
    buf = io.BytesIO()
    Image.fromarray((images[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=95)
    assert incomp[1].item() == pytest.approx(buf.tell() / 1000)
    assert torch.equal(comp, -incomp)
    assert comp[0] > comp[1]


def clip(events: list[int], offset_s: float, seed: int) -> dict:
    """Video that cuts (toggles black/white) at each event frame; audio with a 20 ms noise click ``offset_s`` after
    each cut."""
    video = torch.zeros(1, FRAMES, 3, 8, 8)
    for e in events:
        video[0, e:] = 1.0 - video[0, e:]
    g = torch.Generator().manual_seed(seed)
    audio = 0.001 * torch.randn(1, 1, int(FRAMES / FPS * SR), generator=g)
    for e in events:
        start = int((e / FPS + offset_s) * SR)
        if 0 <= start < audio.shape[-1]:
            n = min(int(0.02 * SR), audio.shape[-1] - start)
            audio[0, 0, start : start + n] += torch.randn(n, generator=g)
    return {"video": video, "audio": audio, "sample_rate": SR, "fps": FPS}


@pytest.mark.parametrize("offset_frames", [0, 3, -5, 8])
def test_av_sync_finds_a_known_offset(offset_frames):
    events = [5, 14, 20, 33, 41, 50, 61]
    out = av_sync(clip(events, offset_frames / FPS, seed=1))
    assert out["av_offset_s"].item() == pytest.approx(offset_frames / FPS, abs=1 / FPS + 1e-6)
    assert out["av_sync"].item() == pytest.approx(1 / (1 + abs(out["av_offset_s"].item())))
    assert out["av_corr"].item() > 0.5


def test_av_sync_scores_shuffled_audio_low():
    rng = np.random.default_rng(0)
    clips = [clip(sorted(rng.choice(np.arange(2, FRAMES - 2), 7, replace=False).tolist()), 0.0, s) for s in range(6)]
    matched = [av_sync(c) for c in clips]
    shuffled = [av_sync({**c, "audio": clips[(i + 1) % 6]["audio"]}) for i, c in enumerate(clips)]
    assert min(m["av_sync"].item() for m in matched) == pytest.approx(1.0)
    assert np.mean([s["av_corr"].item() for s in shuffled]) < 0.5 * np.mean([m["av_corr"].item() for m in matched])
    assert np.mean([s["av_sync"].item() for s in shuffled]) < 0.8


def test_lagged_correlation_against_numpy():
    g = torch.Generator().manual_seed(3)
    a, v = torch.randn(2, 30, generator=g), torch.randn(2, 30, generator=g)
    corr = lagged_correlation(a, v, 4)
    for lag in (-4, 0, 2):
        x = a[1, max(lag, 0) : 30 + min(lag, 0)].numpy()
        y = v[1, max(-lag, 0) : 30 - max(lag, 0)].numpy()
        assert corr[1, lag + 4].item() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-5)


def test_envelopes_shapes_and_stereo():
    media = clip([10, 30], 0.0, seed=0)
    stereo = media["audio"].repeat(1, 2, 1)
    assert onset_envelope(stereo, SR, FPS, FRAMES).shape == (1, FRAMES)
    assert torch.allclose(onset_envelope(stereo, SR, FPS, FRAMES), onset_envelope(media["audio"], SR, FPS, FRAMES))
    assert motion_energy(media["video"]).shape == (1, FRAMES)
    with pytest.raises(ValueError, match="at least 3 video frames"):
        av_sync({**media, "video": media["video"][:, :2]})


def test_registered_by_name():
    import rewards

    media = clip([10, 30, 50], 0.0, seed=0)
    assert rewards.load("av_sync", max_offset_s=0.5)(media, [""])["av_sync"].item() == pytest.approx(1.0)
    assert rewards.load("jpeg_compressibility")(torch.zeros(2, 3, 8, 8), ["", ""])["jpeg_compressibility"].shape == (2,)
    with pytest.raises(ValueError, match="max_offset_s"):
        rewards.load("av_sync", max_offset_s=0)


def test_image_reward_on_video_frames_with_reduction():
    def brightness(media, prompts):
        return {"bright": media.mean(dim=(1, 2, 3))}

    from rewards.video import on_frames, temporal_consistency

    video = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.4, 0.9, 0.5, 0.1)])[None].repeat(2, 1, 1, 1, 1)
    out = on_frames(brightness, stride=2, reduction="min")(video, ["a", "b"])
    assert torch.allclose(out["bright"], torch.tensor([0.1, 0.1]))  # frames 0, 2, 4 -> 0.2, 0.9, 0.1
    assert on_frames(brightness, stride=2)(video, ["a", "b"])["bright"][0].item() == pytest.approx(0.4)
    assert out["temporal_consistency"][0].item() == pytest.approx(1 - (0.2 + 0.5 + 0.4 + 0.4) / 4)
    av = {"video": video, "audio": torch.zeros(2, 2, 100), "fps": 24.0, "sample_rate": 16000}
    assert torch.equal(on_frames(brightness, stride=2, reduction="min")(av, ["a", "b"])["bright"], out["bright"])
    assert temporal_consistency(torch.zeros(1, 3, 3, 2, 2)).item() == 1.0
    import rewards

    jpeg = rewards.load("video:jpeg_compressibility", stride=3, quality=90)(video, ["a", "b"])
    assert set(jpeg) == {"jpeg_compressibility", "temporal_consistency"} and jpeg["jpeg_compressibility"].shape == (2,)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        rewards.load("video:jpeg_compressibility", reduction="max")
