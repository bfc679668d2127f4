"""Segmentation data: layouts, masks, joint augmentation, Synapse volumes, and bad-input lines."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.segmentation_layouts import (
    DEFAULT_PALETTE, FolderSegDataset, JointAugment, SynapseSlices, layout_pairs, predict_volume, read_list,
    read_mask, read_volume, save_mask_png, synapse_list,
)
from tasks.data.segmentation_generate import make_folder_dataset, make_synapse_dataset


@pytest.mark.parametrize("layout,split", [("folder", "train"), ("kvasir", "train"), ("isic", "val"), ("drive", "test")])
def test_layouts_read_back(tmp_path, layout, split):
    splits = {"train": 3, "val": 2} if layout in ("folder", "isic") else ({"test": 2} if layout == "drive" else None)
    root = make_folder_dataset(tmp_path / layout, layout=layout, n=3, size=32, num_classes=3, splits=splits)
    pairs = layout_pairs(root, layout, split)
    assert len(pairs) == (splits or {"train": 3})[split]
    fmt = "index" if layout == "folder" else "binary"
    k = 3 if layout == "folder" else 1
    ds = FolderSegDataset(pairs, k, img_size=48, mask_format=fmt, layout=layout)
    img, mask = ds[0]
    assert img.shape == (3, 48, 48) and 0 <= img.min() and img.max() <= 1
    assert mask.shape == (48, 48) and mask.dtype == torch.long and int(mask.max()) <= k


def test_index_and_color_masks_agree(tmp_path):
    a = make_folder_dataset(tmp_path / "idx", n=2, size=32, num_classes=3, seed=5)
    b = make_folder_dataset(tmp_path / "col", n=2, size=32, num_classes=3, seed=5, mask_format="color")
    m_idx = read_mask(a / "masks" / "img_000.png", "index", 3, None)
    m_col = read_mask(b / "masks" / "img_000.png", "color", 3, DEFAULT_PALETTE[:4])
    assert m_idx.max() >= 1 and np.array_equal(m_idx, m_col)
    with pytest.raises(ValueError, match="needs a palette"):
        read_mask(b / "masks" / "img_000.png", "color", 3, None)
    with pytest.raises(ValueError, match="not in the palette"):
        read_mask(b / "masks" / "img_000.png", "color", 3, DEFAULT_PALETTE[:2])
    with pytest.raises(ValueError, match="single-channel"):
        read_mask(b / "masks" / "img_000.png", "index", 3, None)


def test_bad_inputs(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=3, size=32, num_classes=3)
    save_mask_png(root / "masks" / "img_000.png", np.full((32, 32), 5))
    with pytest.raises(ValueError, match="label 5 is above num_classes=3"):
        FolderSegDataset(layout_pairs(root, "folder", "train"), 3, 32)[0]
    (root / "masks" / "img_002.png").unlink()
    with pytest.raises(ValueError, match=r"3 images and 2 masks .*images without a mask: \['img_002'\]"):
        layout_pairs(root, "folder", "train")
    save_mask_png(root / "masks" / "img_002.png", np.zeros((16, 16)))
    with pytest.raises(ValueError, match="is 32x32 but its mask img_002.png is 16x16"):
        FolderSegDataset(layout_pairs(root, "folder", "train"), 3, 32)[2]
    with pytest.raises(FileNotFoundError, match="folder not found"):
        layout_pairs(tmp_path / "nothing", "folder", "train")
    with pytest.raises(ValueError, match="valid: folder, kvasir, isic, drive"):
        layout_pairs(root, "coco", "train")
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_list(synapse_list(tmp_path, "train.txt"))


def test_joint_augmentation_keeps_alignment():
    """The image carries the mask's one-hot code: after any augmentation, argmax(image) == mask."""
    mask = torch.zeros(24, 24, dtype=torch.long)
    mask[3:10, 5:18] = 1
    mask[12:20, 2:8] = 2
    image = torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float()
    aug = JointAugment(True)
    seen = set()
    for s in range(40):
        im, m = aug(image, mask, random.Random(s))
        assert torch.equal(im.argmax(0)[im.sum(0) > 0], m[im.sum(0) > 0])
        seen.add(tuple(m.flatten().tolist()))
    assert len(seen) > 5  # rotations and flips really happened


def test_synapse_layout_and_volume_eval(tmp_path):
    root = make_synapse_dataset(tmp_path / "syn", train_cases=2, test_cases=1, depth=4, size=32, num_classes=3)
    names = read_list(synapse_list(root, "train.txt"))
    assert len(names) == 8 and names[0] == "case0001_slice000"
    img, mask = SynapseSlices(root, names, 3, img_size=48)[1]
    assert img.shape == (3, 48, 48) and torch.equal(img[0], img[2]) and mask.shape == (48, 48)
    case = read_list(synapse_list(root, "test_vol.txt"))[0]
    vol, lab = read_volume(root, case, 3)
    assert vol.shape == lab.shape == (4, 32, 32)
    # volume prediction stacks slices in order: an oracle predicting slice z's label gives the label
    calls = []

    def oracle(x):
        z0 = len(calls)
        calls.append(x.shape[0])
        return torch.from_numpy(lab[z0 * 3:z0 * 3 + x.shape[0]])

    pred = predict_volume(oracle, vol, img_size=32, batch=3)
    assert calls == [3, 1] and np.array_equal(pred, lab)
    with pytest.raises(ValueError, match="outside 0..2"):
        read_volume(root, case, 2)
    with pytest.raises(FileNotFoundError, match="listed but missing"):
        read_volume(root, "case9999", 3)


def test_prompted_volume_prediction_gets_each_slices_labels():
    """Prompted mode on a volume: predict_slices(x, y) receives the same slices' ground truth at the
    input size (nearest), so prompts are built per slice as for 2-D images."""
    rng = np.random.default_rng(0)
    vol = rng.random((5, 32, 32), dtype=np.float32)
    lab = np.zeros((5, 32, 32), dtype=np.int64)
    for z in range(5):
        lab[z, 4 + z:20, 6:10 + 3 * z] = 1 + z % 3
    seen = []

    def oracle(x, y):
        assert x.shape[-2:] == y.shape[-2:] == (64, 64) and x.shape[0] == y.shape[0]
        seen.append(y)
        return y  # a perfect prompted model: the mask its prompts came from

    pred = predict_volume(oracle, vol, img_size=64, batch=2, label=lab)
    assert [len(y) for y in seen] == [2, 2, 1] and np.array_equal(pred, lab)
    assert torch.equal(seen[1][1], torch.from_numpy(lab[3]).repeat_interleave(2, 0).repeat_interleave(2, 1))
    with pytest.raises(ValueError, match="volume label .* and image .* differ in shape"):
        predict_volume(oracle, vol, img_size=64, label=lab[:3])


def test_png_mask_round_trip(tmp_path):
    lab = np.random.default_rng(0).integers(0, 4, (10, 12))
    save_mask_png(tmp_path / "m.png", lab)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), lab)
    assert not list(tmp_path.glob("*.tmp"))


def test_generated_style_on_a_layout_without_it_is_refused(tmp_path):
    with pytest.raises(ValueError, match="style='texture' applies to layout=folder only"):
        make_folder_dataset(tmp_path, layout="kvasir", n=2, size=16, style="texture")
    assert not any(tmp_path.iterdir())  # nothing written
