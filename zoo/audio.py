"""The AST front end: waveform → Kaldi log-mel fbank → pad/cut → ``(x − μ)/(2σ)``, plus augmentations.

Follows the original AST data loader (Gong et al., Interspeech 2021; ``YuanGongND/ast`` src/dataloader.py
``_wav2fbank``) and HF ``ASTFeatureExtractor``:

* decode with soundfile (torchaudio >= 2.9 moved its I/O to TorchCodec); stereo is downmixed to mono
  and a wrong sample rate is resampled with ``torchaudio.functional.resample``; each is reported;
* subtract the waveform's mean (original AST; HF does not, and Kaldi removes each frame's DC anyway);
* ``torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=sr, use_energy=False,
  window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)``: 25 ms windows, 10 ms hop,
  preemphasis 0.97, power spectrum, log mel → ``[frames, 128]`` at 100 frames/s;
* zero rows appended up to ``max_length`` frames, or the first ``max_length`` frames kept;
* SpecAugment (training): ``torchaudio.transforms.FrequencyMasking(freqm)`` then ``TimeMasking(timem)``
  on the ``[1, F, T]`` view, *before* normalisation as in the reference loader (masked cells are raw 0,
  ``−mean/(2·std)`` after it); ``specaug_after_norm=True`` masks the normalised features instead (masked
  cells 0), as PETL-AST does on the HF feature extractor's output (``dataset/esc_50.py``);
* normalisation ``(x − mean) / (2 · std)`` with per-dataset statistics (:data:`NORM_STATS`);
* mixup (:func:`mixup_waveforms`): at waveform level, λ ~ Beta(10, 10), both clips mean-centred;
* AST's Speech-Commands noise augmentation (:func:`add_noise_and_shift`, training, ``noise=True``), after
  normalisation as in the reference loader.

:class:`FbankCache` stores the raw (unpadded, unnormalised) fbank of a file on disk keyed by the file's
path, size, mtime, inode and ctime and the fbank arguments, so epoch 2 reads instead of recomputing (ctime,
which every content write sets and nobody can set back, catches a same-size edit whose mtime was put back).
Plain PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("zoo.audio")

# (mean, std) of the fbank per dataset, from the AST recipes (egs/*/run*.sh)
NORM_STATS = {
    "audioset": (-4.2677393, 4.5689974),
    "esc50": (-6.6268077, 5.358466),
    "speechcommands": (-6.845978, 5.5654526),
}


class AudioDecodeError(ValueError):
    """A file that cannot be used as audio (corrupt, empty, too short); the message names the file."""


@dataclass(frozen=True)
class FbankArgs:
    """The arguments that determine a raw fbank (the cache key, with the file's identity)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length: float = 25.0  # ms
    frame_shift: float = 10.0  # ms
    subtract_mean: bool = True


def load_wav(path: str | os.PathLike, sample_rate: int = 16000) -> tuple[torch.Tensor, list[str]]:
    """Decode ``path`` to a mono float32 ``[1, N]`` waveform at ``sample_rate``.

    Returns ``(waveform, notes)``: notes say what was changed (downmixed, resampled).
    Raises :class:`AudioDecodeError` for unreadable or empty files.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...
        raise AudioDecodeError(f"{path}: cannot decode audio ({str(e).splitlines()[0][:160]}); replace or remove the file") from None
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: empty audio (0 samples); replace or remove the file")
    check_samples(data, path)
    notes = []
    wave = torch.from_numpy(data.T.copy())  # [C, N]
    if wave.shape[0] > 1:
        notes.append(f"{wave.shape[0]} channels downmixed to mono")
        wave = wave.mean(dim=0, keepdim=True)
    if sr != sample_rate:
        import torchaudio.functional as AF

        notes.append(f"{sr} Hz resampled to {sample_rate} Hz")
        wave = AF.resample(wave, sr, sample_rate)
    return wave, notes


# Decoded audio lies in -1..1; a float WAV may overshoot a little (clipping), but a peak of 2^15 or
# 1e30 is a file written in the wrong scale, whose loss would blow up as if the learning rate were too high.
MAX_PEAK = 16.0


def check_samples(data, path) -> None:
    """Refuse NaN/inf samples and samples far outside -1..1, naming the file."""
    import numpy as np

    finite = np.isfinite(data)
    if not finite.all():
        raise AudioDecodeError(f"{path}: {int((~finite).sum())} of {data.size} samples are NaN or inf; "
                               "replace or remove the file")
    peak = float(np.abs(data).max())
    if peak > MAX_PEAK:
        raise AudioDecodeError(f"{path}: samples reach {peak:.3g}, but audio must lie in -1..1 (a float file "
                               "written in integer scale?); rescale, replace or remove the file")


def fbank(wave: torch.Tensor, args: FbankArgs = FbankArgs(), source: str = "waveform") -> torch.Tensor:
    """Kaldi log-mel fbank ``[frames, num_mel_bins]`` with the AST reference arguments."""
    import torchaudio.compliance.kaldi as kaldi

    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    min_len = int(args.sample_rate * args.frame_length / 1000)
    if wave.shape[-1] < min_len:
        raise AudioDecodeError(
            f"{source}: {wave.shape[-1]} samples is shorter than one {args.frame_length:g} ms window "
            f"({min_len} samples at {args.sample_rate} Hz); replace or remove the clip")
    if args.subtract_mean:
        wave = wave - wave.mean()
    return kaldi.fbank(wave, htk_compat=True, sample_frequency=args.sample_rate, use_energy=False,
                       window_type="hanning", num_mel_bins=args.num_mel_bins, dither=0.0,
                       frame_length=args.frame_length, frame_shift=args.frame_shift)


def pad_or_cut(fb: torch.Tensor, max_length: int) -> torch.Tensor:
    """Zero rows appended up to ``max_length`` frames, or the first ``max_length`` frames kept."""
    n = fb.shape[0]
    if n < max_length:
        return torch.nn.functional.pad(fb, (0, 0, 0, max_length - n))
    return fb[:max_length]


def normalize(fb: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x − mean) / (2 · std)``: roughly mean 0, std 0.5 (AST)."""
    return (fb - mean) / (2.0 * std)


class SpecAugment(torch.nn.Module):
    """torchaudio's frequency then time masking on a ``[T, F]`` fbank (Park et al., Interspeech 2019)."""

    def __init__(self, freqm: int = 0, timem: int = 0):
        super().__init__()
        import torchaudio.transforms as T

        self.freqm, self.timem = int(freqm), int(timem)
        self.fmask = T.FrequencyMasking(self.freqm) if self.freqm > 0 else None
        self.tmask = T.TimeMasking(self.timem) if self.timem > 0 else None

    def forward(self, fb: torch.Tensor) -> torch.Tensor:
        x = fb.t().unsqueeze(0)  # [1, F, T]
        if self.fmask is not None:
            x = self.fmask(x)
        if self.tmask is not None:
            x = self.tmask(x)
        return x.squeeze(0).t()


def mixup_waveforms(w1: torch.Tensor, w2: torch.Tensor, lam: float) -> torch.Tensor:
    """AST's waveform mixup: centre both, fit ``w2`` to ``w1``'s length, ``λ w1 + (1−λ) w2``, re-centre."""
    w1 = w1 - w1.mean()
    w2 = w2 - w2.mean()
    n = w1.shape[-1]
    w2 = torch.nn.functional.pad(w2, (0, n - w2.shape[-1])) if w2.shape[-1] < n else w2[..., :n]
    mix = lam * w1 + (1.0 - lam) * w2
    return mix - mix.mean()


def add_noise_and_shift(fb: torch.Tensor, max_noise: float = 0.1, max_shift: int = 10,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """AST's ``noise`` augmentation (its Speech Commands recipe; ``YuanGongND/ast`` src/dataloader.py):
    ``x + U[0,1)^{T×F} · a`` with ``a ~ U[0, max_noise)``, then ``roll`` along time by ``s ~ U{−max_shift, …,
    max_shift − 1}`` frames (wrapping around), on the normalised ``[T, F]`` fbank."""
    a = torch.rand((), generator=generator) * max_noise
    x = fb + torch.rand(fb.shape, generator=generator) * a
    s = int(torch.randint(-max_shift, max_shift, (), generator=generator))
    return torch.roll(x, s, dims=0)


class FbankCache:
    """Raw fbanks on disk, one safetensors file per (file, size, mtime, inode, ctime, :class:`FbankArgs`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def key(self, path: str | os.PathLike, args: FbankArgs) -> str:
        p = Path(path).resolve()
        st = p.stat()
        ident = json.dumps([str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, asdict(args)], sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()

    def get(self, path, args: FbankArgs) -> torch.Tensor | None:
        f = self._file(self.key(path, args))
        if not f.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(f))["fbank"]
        except Exception:  # a damaged cache entry is recomputed
            return None

    def put(self, path, args: FbankArgs, fb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        f = self._file(self.key(path, args))
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        save_file({"fbank": fb.contiguous()}, str(tmp))
        os.replace(tmp, f)

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"


class FrontEnd:
    """File → normalised ``[max_length, F]`` fbank, with the cache, SpecAugment and notes.

    ``load(path)`` returns the raw fbank (cached); ``__call__(path, train)`` the model input.
    ``notes`` counts what was changed per kind (e.g. resampling) and logs the first file of each kind.
    ``noise``: AST's Speech-Commands noise + time shift (:func:`add_noise_and_shift`) on training inputs.
    """

    def __init__(self, max_length: int = 1024, mean: float = NORM_STATS["audioset"][0],
                 std: float = NORM_STATS["audioset"][1], args: FbankArgs = FbankArgs(), freqm: int = 0,
                 timem: int = 0, cache_dir: str | os.PathLike | None = None, normalize: bool = True,
                 noise: bool = False, specaug_after_norm: bool = False):
        self.max_length, self.mean, self.std, self.args = int(max_length), float(mean), float(std), args
        self.specaug_after_norm = bool(specaug_after_norm)
        self.specaug = SpecAugment(freqm, timem)
        self.cache = FbankCache(cache_dir) if cache_dir else None
        self.do_normalize = normalize
        self.noise = bool(noise)
        self.notes: dict[str, int] = {}

    def _note(self, path, notes: list[str]) -> None:
        for n in notes:
            kind = n
            if kind not in self.notes:
                log.warning("audio: %s: %s (further files with this note are counted, not listed)", path, n)
            self.notes[kind] = self.notes.get(kind, 0) + 1

    def wave(self, path) -> torch.Tensor:
        w, notes = load_wav(path, self.args.sample_rate)
        self._note(path, notes)
        return w

    def load(self, path) -> torch.Tensor:
        if self.cache is not None:
            fb = self.cache.get(path, self.args)
            if fb is not None:
                return fb
        fb = fbank(self.wave(path), self.args, source=str(path))
        if fb.shape[0] < 16:  # AST pads it like any short clip; said, since it is mostly silence then
            self._note(path, [f"shorter than one 16-frame patch (< {self.args.frame_shift * 15 + self.args.frame_length:g} ms): zero-padded"])
        if self.cache is not None:
            self.cache.put(path, self.args, fb)
        return fb

    def finish(self, fb: torch.Tensor, train: bool = False) -> torch.Tensor:
        fb = pad_or_cut(fb, self.max_length)
        if train and not self.specaug_after_norm:
            fb = self.specaug(fb)
        if self.do_normalize:
            fb = normalize(fb, self.mean, self.std)
        if train and self.specaug_after_norm:
            fb = self.specaug(fb)
        return add_noise_and_shift(fb) if train and self.noise else fb

    def __call__(self, path, train: bool = False) -> torch.Tensor:
        return self.finish(self.load(path), train)


def dataset_stats(fbanks, target_length: int | None = None, batch_size: int = 1000) -> tuple[float, float]:
    """``(mean, std)`` for :func:`normalize`, as AST's ``get_norm_stats.py``: the fbanks ``[T, F]`` are padded
    with zeros (or cut) to ``target_length`` frames as the training loader does, taken in batches of
    ``batch_size`` clips (the script's DataLoader: 1000, in order), and the **batches'** ``torch.mean`` and
    ``torch.std`` (unbiased, over every element of the padded batch) are averaged over the batches.

    Not reproduced: the script ran its loader in training mode, so SpecAugment masks and mixup (random)
    were applied to the clips it measured; these statistics are of the clean, padded fbanks.
    """
    means, stds, batch = [], [], []

    def flush():
        x = torch.stack(batch)
        means.append(float(torch.mean(x)))
        stds.append(float(torch.std(x)))
        batch.clear()

    for fb in fbanks:
        fb = torch.as_tensor(fb, dtype=torch.float32)
        if target_length is not None:
            n = fb.shape[0]
            fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - n)) if n < target_length else fb[:target_length]
        batch.append(fb)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not means:
        raise ValueError("no clips to compute fbank statistics from (the training split is empty)")
    return sum(means) / len(means), sum(stds) / len(stds)
