"""AST front end: HF ASTFeatureExtractor oracle, decoding notes and errors, cache, SpecAugment, mixup."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from zoo import audio
from zoo.audio import AudioDecodeError, FbankArgs, FrontEnd


def tone(sr=16000, seconds=1.0, f=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * f * t) + 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.mark.parametrize("subtract_mean", [False, True])
def test_equals_hf_ast_feature_extractor(subtract_mean):
    transformers = pytest.importorskip("transformers")
    wave = tone(seconds=1.3) + 0.05  # a DC offset: the one place original AST and HF differ
    fe = transformers.ASTFeatureExtractor(max_length=128)
    ref = torch.as_tensor(fe(wave, sampling_rate=16000, return_tensors="np")["input_values"][0])
    fb = audio.fbank(torch.from_numpy(wave), FbankArgs(subtract_mean=subtract_mean))
    ours = audio.normalize(audio.pad_or_cut(fb, 128), *audio.NORM_STATS["audioset"])
    assert ours.shape == ref.shape == (128, 128)
    # Kaldi removes each frame's DC before preemphasis, so the global mean subtraction changes nothing
    # beyond float rounding
    assert torch.allclose(ours, ref, atol=1e-4 if subtract_mean else 1e-5), (ours - ref).abs().max()


def test_reference_arguments_and_pad_cut():
    fb = audio.fbank(torch.from_numpy(tone(seconds=1.0)))
    assert fb.shape == (98, 128)  # snip_edges: 1 + (16000 - 400) // 160 frames
    padded = audio.pad_or_cut(fb, 120)
    assert torch.equal(padded[:98], fb) and torch.all(padded[98:] == 0)
    assert torch.equal(audio.pad_or_cut(fb, 50), fb[:50])
    x = torch.randn(4, 3)
    assert torch.allclose(audio.normalize(x, 1.0, 2.0), (x - 1.0) / 4.0)


def test_decode_notes_and_bad_files(tmp_path, caplog):
    sf.write(tmp_path / "stereo.wav", tone(channels=2), 16000)
    w, notes = audio.load_wav(tmp_path / "stereo.wav")
    mono = torch.from_numpy(tone()).float()
    assert w.shape == (1, 16000) and notes == ["2 channels downmixed to mono"]
    assert torch.allclose(w[0], 0.75 * mono, atol=1e-4)  # mean of x and x/2 (16-bit quantised)
    sf.write(tmp_path / "cd.wav", tone(sr=44100), 44100)
    w, notes = audio.load_wav(tmp_path / "cd.wav", 16000)
    assert w.shape == (1, 16000) and notes == ["44100 Hz resampled to 16000 Hz"]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(AudioDecodeError, match="corrupt.wav: cannot decode audio"):
        audio.load_wav(tmp_path / "corrupt.wav")
    (tmp_path / "zero_bytes.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="zero_bytes.wav"):
        audio.load_wav(tmp_path / "zero_bytes.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioDecodeError, match="empty.wav: empty audio"):
        audio.load_wav(tmp_path / "empty.wav")
    sf.write(tmp_path / "blip.wav", tone(seconds=0.01), 16000)
    fe = FrontEnd(max_length=32)
    with pytest.raises(AudioDecodeError, match="blip.wav: 160 samples is shorter than one 25 ms window"):
        fe(tmp_path / "blip.wav")
    sf.write(tmp_path / "short.wav", tone(seconds=0.1), 16000)  # 8 frames
    assert fe(tmp_path / "short.wav").shape == (32, 128)
    assert fe.notes == {"shorter than one 16-frame patch (< 175 ms): zero-padded": 1}
    fe.notes.clear()
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        audio.load_wav(tmp_path / "missing.wav")
    with caplog.at_level("WARNING", logger="zoo.audio"):
        fe(tmp_path / "cd.wav")
        fe(tmp_path / "cd.wav")
    assert fe.notes == {"44100 Hz resampled to 16000 Hz": 2}
    assert sum("resampled" in r.message for r in caplog.records) == 1  # said once, counted after


def test_cache_is_keyed_by_file_and_arguments(tmp_path, monkeypatch):
    sf.write(tmp_path / "a.wav", tone(), 16000)
    calls = []
    real = audio.fbank
    monkeypatch.setattr(audio, "fbank", lambda *a, **k: calls.append(1) or real(*a, **k))
    fe = FrontEnd(max_length=100, cache_dir=tmp_path / "cache")
    first = fe(tmp_path / "a.wav")
    second = fe(tmp_path / "a.wav")
    assert len(calls) == 1 and torch.equal(first, second)
    other = FrontEnd(max_length=100, cache_dir=tmp_path / "cache", args=FbankArgs(num_mel_bins=64))
    assert other(tmp_path / "a.wav").shape == (100, 64) and len(calls) == 2
    sf.write(tmp_path / "a.wav", tone(f=880.0, seconds=1.1), 16000)  # the file changed: recomputed
    assert not torch.equal(fe(tmp_path / "a.wav"), first) and len(calls) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_notices_a_same_size_edit_whose_mtime_was_put_back(tmp_path):
    """Keyed on size + mtime only, the old fbank of the edited clip was used (a silent wrong input)."""
    import os
    import time

    f = tmp_path / "a.wav"
    sf.write(f, tone(f=440.0), 16000)
    fe = FrontEnd(max_length=100, cache_dir=tmp_path / "cache")
    first = fe(f)
    st = f.stat()
    time.sleep(0.01)
    sf.write(f, tone(f=880.0), 16000)  # same length, same format: the same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert not torch.equal(fe(f), first)


def test_specaugment_masks_before_normalisation():
    torch.manual_seed(3)
    fb = torch.randn(200, 128) - 5
    out = audio.SpecAugment(freqm=24, timem=80)(fb)
    zero_cols = (out == 0).all(dim=0).sum()
    zero_rows = (out == 0).all(dim=1).sum()
    assert 0 < zero_cols <= 24 and 0 < zero_rows <= 80
    assert torch.equal(out[out != 0], fb[out != 0])
    assert torch.equal(audio.SpecAugment(0, 0)(fb), fb)
    fe = FrontEnd(max_length=200, mean=-5.0, std=1.0, freqm=24, timem=0)
    x = fe.finish(fb, train=True)
    assert ((x - 2.5).abs() < 1e-6).all(dim=0).sum() > 0  # a masked band: 0 -> (0 + 5) / 2
    assert torch.equal(fe.finish(fb, train=False), (fb - -5.0) / 2.0)


def test_mixup_waveforms_math():
    w1, w2 = torch.randn(1, 100) + 1, torch.randn(1, 60) - 2
    lam = 0.3
    mix = audio.mixup_waveforms(w1, w2, lam)
    c1, c2 = w1 - w1.mean(), torch.nn.functional.pad(w2 - w2.mean(), (0, 40))
    ref = lam * c1 + (1 - lam) * c2
    assert torch.allclose(mix, ref - ref.mean(), atol=1e-6) and math.isclose(float(mix.mean()), 0, abs_tol=1e-6)
