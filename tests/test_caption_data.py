"""Captioning data: frame sampler, MSR-VTT / MSVD split sizes, one sample per caption, decoding, bad input."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from tasks.data import captioning as cd


def test_frame_sampler_indices():
    assert cd.sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]  # segment centres
    assert cd.sample_indices(8, 8) == list(range(8))
    assert cd.sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat frames, K stays 8
    assert cd.sample_indices(100, 12, "linspace") == [int(round(x)) for x in np.linspace(0, 99, 12)]  # CLIP4Clip
    assert cd.sample_indices(100, 12, "linspace")[0] == 0 and cd.sample_indices(100, 12, "linspace")[-1] == 99
    for n in (1, 7, 30, 301):
        idx = cd.sample_indices(n, 8)
        assert len(idx) == 8 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    with pytest.raises(ValueError, match="no frames"):
        cd.sample_indices(0, 8)
    with pytest.raises(ValueError, match="valid: center, linspace"):
        cd.sample_indices(10, 4, "bogus")


def _msrvtt_json(path, with_split: bool):
    names = ["train"] * 6513 + ["validate"] * 497 + ["test"] * 2990
    videos = [{"video_id": f"video{i}", **({"split": s} if with_split else {})} for i, s in enumerate(names)]
    sentences = [{"video_id": f"video{i}", "caption": f"caption {j} of {i}", "sen_id": 20 * i + j}
                 for i in range(10000) for j in range(20)]
    path.write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    return path


@pytest.mark.parametrize("with_split", [True, False])
def test_msrvtt_official_split_sizes(tmp_path, with_split):
    ann = cd.load_msrvtt(_msrvtt_json(tmp_path / "MSRVTT_data.json", with_split), tmp_path / "videos")
    assert [len(ann.splits[s]) for s in ("train", "val", "test")] == [6513, 497, 2990]
    assert ann.splits["val"][0] == "video6513" and ann.splits["test"][0] == "video7010"
    train = cd.CaptionDataset(ann, "train", "train")
    test = cd.CaptionDataset(ann, "test", "eval")
    assert len(train) == 130260 and len(test) == 2990  # one sample per caption / per video (sentences in the doc)
    assert ann.video_path("video3") == tmp_path / "videos" / "video3.mp4"


def test_msvd_layout_and_caption_files(tmp_path):
    ids = [f"clip{i}_{i}_{i + 5}" for i in range(1970)]
    for name, part in (("train", ids[:1200]), ("val", ids[1200:1300]), ("test", ids[1300:])):
        (tmp_path / f"{name}_list.txt").write_text("\n".join(part) + "\n")
    # raw-captions.pkl: id -> captions as token lists (joined with spaces)
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({v: [["a", "man", "is", "cooking"], ["someone", "cooks"]] for v in ids}))
    ann = cd.load_msvd(tmp_path, tmp_path / "videos")
    assert [len(ann.splits[s]) for s in ("train", "val", "test")] == [1200, 100, 670]
    assert ann.captions[ids[0]] == ["a man is cooking", "someone cooks"]
    assert ann.video_path(ids[0]).suffix == ".avi"
    assert len(cd.CaptionDataset(ann, "train", "train")) == 2400 and len(cd.CaptionDataset(ann, "test", "eval")) == 670
    (tmp_path / "caps.txt").write_text("".join(f"{v} a dog runs\n{v} a dog is running\n" for v in ids))
    assert cd.load_msvd(tmp_path, tmp_path, "caps.txt").captions[ids[5]] == ["a dog runs", "a dog is running"]


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_bad_caption_files_are_one_line(tmp_path):
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="caption file .*empty.pkl is empty"):
        cd.read_msvd_captions(tmp_path / "empty.pkl")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"v": [Evil()]}))
    with pytest.raises(ValueError, match="refusing to unpickle posix.getcwd|refusing to unpickle"):
        cd.read_msvd_captions(tmp_path / "evil.pkl")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="has no captions"):
        cd.read_msvd_captions(tmp_path / "empty.json")
    (tmp_path / "good.json").write_text(json.dumps({"v": ["a cat"]}))
    with pytest.raises(FileNotFoundError, match="MSVD split list not found: .*train_list.txt"):
        cd.load_msvd(tmp_path, tmp_path, "good.json")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        cd.load_msrvtt(tmp_path / "nope.json", tmp_path)
    (tmp_path / "m.json").write_text(json.dumps({"videos": [{"video_id": "v0", "split": "train"}], "sentences": []}))
    with pytest.raises(ValueError, match="m.json: 1 train video\\(s\\) have no \\(non-empty\\) caption, e.g. 'v0'"):
        cd.load_msrvtt(tmp_path / "m.json", tmp_path)


def test_decoding_videos_frame_folders_and_bad_videos(tmp_path):
    clip = cd.render_clip("red", "square", "left", np.random.default_rng(0), frames=16)
    cd.write_video(tmp_path / "v.mp4", clip)
    frames = cd.read_frames(tmp_path / "v.mp4", 8)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8

    def red_x(fr):  # column centroid of the red pixels per frame
        red = [(f[..., 0].astype(int) - f[..., 1] > 100).sum(0) for f in fr]
        return np.array([(np.arange(32) * r).sum() / r.sum() for r in red])

    xs, ref = red_x(frames), red_x(clip[cd.sample_indices(16, 8)])
    assert xs[0] - xs[-1] > 12 and np.abs(xs - ref).max() < 2.5  # "moves left", within the codec's blur
    assert np.abs(frames.astype(int) - clip[cd.sample_indices(16, 8)].astype(int)).mean() < 15  # lossy codec
    from PIL import Image

    (tmp_path / "frames").mkdir()
    for i, f in enumerate(clip):
        Image.fromarray(f).save(tmp_path / "frames" / f"{i:05d}.png")
    assert np.array_equal(cd.read_frames(tmp_path / "frames", 4), clip[cd.sample_indices(16, 4)])
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    with pytest.raises(ValueError, match="cannot decode video .*bad.mp4") as e:
        cd.read_frames(tmp_path / "bad.mp4", 8)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="video not found: .*missing.mp4"):
        cd.read_frames(tmp_path / "missing.mp4", 8)


def test_shapes_datamodule(tmp_path):
    dm = cd.CaptionDataModule("shapes", root=str(tmp_path), shapes_split=(6, 2, 2), img_size=32, num_frames=4,
                              batch_size=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    dm.setup()
    assert len(dm.train_set) == 18 and len(dm.val_set) == 2 and len(dm.test_set) == 2  # 3 captions per video
    b = next(iter(dm.train_dataloader()))
    assert b["frames"].shape == (3, 4, 3, 32, 32) and b["frames"].dtype == torch.float32
    assert all(c.split()[-1] in cd.MOTIONS and len(r) == 3 and c in r for c, r in zip(b["caption"], b["refs"]))
    v = next(iter(dm.val_dataloader()))
    assert len(v["refs"][0]) == 3 and v["video_id"][0] == "video6"
    with pytest.raises(ValueError, match="valid: msrvtt, msvd, shapes"):
        cd.CaptionDataModule("youcook")


def test_random_segment_sampling():
    rng = np.random.default_rng(0)
    draws = np.array([cd.sample_indices(16, 4, "random", rng) for _ in range(400)])
    for i in range(4):  # one frame of each equal segment [4i, 4i+4), every frame of it reachable
        assert set(draws[:, i]) == set(range(4 * i, 4 * i + 4))
    assert cd.sample_indices(16, 4, "random", np.random.default_rng(5)) == cd.sample_indices(16, 4, "random", np.random.default_rng(5))
    assert cd.sample_indices(3, 8, "random") == cd.sample_indices(3, 8)  # too short: the centres


def test_motion_trail_shows_the_direction_in_one_frame():
    def red_x(frame):  # column centroid of the reddish pixels (the shape and its paler trail copies)
        f = frame.astype(int)
        cols = (f[..., 0] - f[..., 2] > 60).sum(0)
        return (np.arange(32) * cols).sum() / cols.sum()

    for motion, sign in (("left", 1), ("right", -1)):
        clip = cd.render_clip("red", "circle", motion, np.random.default_rng(1), frames=16, trail=True)
        plain = cd.render_clip("red", "circle", motion, np.random.default_rng(1), frames=16)
        # the same shape at the same place, plus a streak behind it: the red mass shifts against the motion
        shifts = [sign * (red_x(clip[t]) - red_x(plain[t])) for t in (0, 8, 15)]
        assert min(shifts) > 0.5, (motion, shifts)  # (at t=0 part of the streak is off the frame)


def test_trail_sets_are_written_apart(tmp_path):
    a = cd.CaptionDataModule("shapes", root=str(tmp_path), shapes_split=(2, 1, 1), img_size=32, num_frames=2)
    b = cd.CaptionDataModule("shapes", root=str(tmp_path), shapes_split=(2, 1, 1), img_size=32, num_frames=2,
                             trail=True, sampling="random")
    a.setup(), b.setup()
    assert a.load_annotations().video_dir != b.load_annotations().video_dir
    assert b.train_set.sampling == "random" and b.val_set.sampling == b.test_set.sampling == "center"


def test_cached_frames_equal_decoded_ones_and_each_video_is_read_once(tmp_path, monkeypatch):
    """data.cache_frames: the same items as decoding every time, with one read per video (a training video
    has 3 captions, so 3 items), and refused with random sampling (it would freeze one draw)."""
    kw = dict(root=str(tmp_path), shapes_split=(4, 2, 2), img_size=32, num_frames=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    plain, cached = cd.CaptionDataModule("shapes", **kw), cd.CaptionDataModule("shapes", cache_frames=True, **kw)
    plain.setup(), cached.setup()
    reads = []
    real = cd.read_frames
    monkeypatch.setattr(cd, "read_frames", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    for _ in range(2):  # two epochs
        for i in range(len(cached.train_set)):
            a, b = plain.train_set[i], cached.train_set[i]
            assert torch.equal(a["frames"], b["frames"]) and a["caption"] == b["caption"]
    assert len(reads) == 2 * 12 + 4  # plain: every item, every epoch; cached: each of the 4 videos once
    with pytest.raises(ValueError, match="cache_frames=true .* not random"):
        cd.CaptionDataModule("shapes", cache_frames=True, sampling="random", **kw)
