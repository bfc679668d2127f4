"""Dice / IoU / HD95 on hand-made masks with known answers, the empty-mask conventions, the losses'
weighting and the smp decoder head."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.losses.segmentation import SegLoss, samed_dice
from tasks.metrics.segmentation import hd95_binary, per_class_scores, samed_case, summarize

pytest.importorskip("medpy")


def _mask(shape, *pixels):
    m = np.zeros(shape, dtype=bool)
    for p in pixels:
        m[p] = True
    return m


def test_hd95_known_answers():
    # single pixels 3-4-5 apart: every surface distance is 5
    assert hd95_binary(_mask((8, 8), (0, 0)), _mask((8, 8), (3, 4))) == pytest.approx(5.0)
    # pooled distances [0 (pred->gt), 0, 10 (gt->pred)]: numpy's 95th percentile = 0 + 0.9 * 10 = 9.0
    # (MONAI's max of directed 95th percentiles would give 9.5: this pins medpy's pooled convention)
    assert hd95_binary(_mask((4, 12), (0, 0)), _mask((4, 12), (0, 0), (0, 10))) == pytest.approx(9.0)
    assert hd95_binary(_mask((4, 4), (1, 1)), _mask((4, 4), (1, 1))) == 0.0


def test_dice_iou_and_conventions():
    pred = torch.zeros(1, 10, 10, dtype=torch.long)
    gt = torch.zeros(1, 10, 10, dtype=torch.long)
    pred[0, 2:5, 2:5] = 1  # 9 px
    gt[0, 3:6, 3:6] = 1  # 9 px, overlap 4
    pred[0, 8, 8] = 2  # class 2: predicted, absent from gt
    # class 3: absent from both; class 4: in gt, not predicted
    gt[0, 0, 9] = 4
    s = per_class_scores(pred, gt, num_classes=4)
    assert s["dice"][0, 0].item() == pytest.approx(2 * 4 / 18)
    assert s["iou"][0, 0].item() == pytest.approx(4 / 14)
    assert s["dice"][0, 1].item() == 0.0 and math.isnan(s["hd95"][0, 1].item())
    assert math.isnan(s["dice"][0, 2].item()) and math.isnan(s["iou"][0, 2].item())
    assert s["dice"][0, 3].item() == 0.0 and math.isnan(s["hd95"][0, 3].item())
    m = summarize(s, ["a", "b", "c", "d"])
    assert m["dice"] == pytest.approx((8 / 18 + 0 + 0) / 3)  # nan class left out
    assert math.isnan(m["dice/c"])

    sam = per_class_scores(pred, gt, num_classes=4, convention="samed")
    # SAMed: gt empty & pred not -> (1, 0); pred empty -> (0, 0), even when both are empty
    assert sam["dice"][0].tolist()[1:] == [1.0, 0.0, 0.0]
    assert sam["hd95"][0].tolist()[1:] == [0.0, 0.0, 0.0]
    assert samed_case(np.zeros((3, 3)), np.zeros((3, 3))) == (0.0, 0.0)
    assert sam["dice"][0, 0].item() == pytest.approx(8 / 18)


def test_volume_scores_are_three_dimensional():
    """A volume counts as one sample: Dice pools its voxels, HD95 uses 3-D surfaces (z spacing 1)."""
    vol_p = torch.zeros(1, 3, 6, 6, dtype=torch.long)
    vol_g = torch.zeros(1, 3, 6, 6, dtype=torch.long)
    vol_p[0, 0, 1:3, 1:3] = 1  # 4 voxels in slice 0
    vol_g[0, 0, 1:3, 1:3] = 1
    vol_g[0, 2, 1:3, 1:3] = 1  # + 4 voxels in slice 2
    s = per_class_scores(vol_p, vol_g, 1)
    assert s["dice"].item() == pytest.approx(2 * 4 / 12)
    assert s["hd95"].item() == pytest.approx(2.0, abs=0.11)  # slice 2 is 2 voxels away in z
    per_slice = per_class_scores(vol_p[0], vol_g[0], 1)["dice"]  # slicewise: 1, nan, 0
    assert per_slice[0].item() == 1.0 and math.isnan(per_slice[1].item()) and per_slice[2].item() == 0.0


def test_samed_loss_weighting_hand_computed():
    logits = torch.zeros(1, 2, 1, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[0, 1]]])
    # SAMed Dice per class: 1 - (2*0.5 + eps) / (0.5 + 1 + eps) = 1/3; CE = ln 2
    assert samed_dice(logits, target, 2).item() == pytest.approx(1 / 3, abs=1e-5)
    loss = SegLoss("samed", dice_weight=0.8, dice="samed")(logits, target)
    assert loss.item() == pytest.approx(0.2 * math.log(2) + 0.8 / 3, abs=1e-5)
    # smp's Dice: 1 - 2*0.5 / (1 + 1) = 0.5 per class
    assert SegLoss("samed", dice="smp")(logits, target).item() == pytest.approx(0.2 * math.log(2) + 0.8 * 0.5, abs=1e-5)
    focal = SegLoss("focal_dice")(logits, target)  # focal: (1-0.5)^2 * ln 2 per pixel; + smp Dice 0.5
    assert focal.item() == pytest.approx(0.25 * math.log(2) + 0.5, abs=1e-5)
    # SALT's focal (α 0.75, γ 3): positives weigh α, negatives 1 − α; all-positive binary target at p = 0.5
    salt = SegLoss("focal_dice", dice_weight=0.0, prompted=True, focal_alpha=0.75, focal_gamma=3.0)
    assert salt(torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 2, dtype=torch.long)).item() == pytest.approx(
        0.75 * 0.5 ** 3 * math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="focal_alpha"):
        SegLoss("focal_dice", focal_alpha=1.5)
    with pytest.raises(ValueError, match="valid: samed, focal_dice, ce"):
        SegLoss("bce")
    with pytest.raises(ValueError, match="differ in size"):
        SegLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


def test_prompted_loss_is_binary_per_class():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 2]]])
    loss = SegLoss("samed", dice_weight=0.0, prompted=True)(logits, target)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # BCE at p = 0.5


@pytest.mark.parametrize("decoder", ["dpt", "fpn"])
def test_smp_head(decoder):
    import zoo
    from zoo.heads.smp import SmpSegmenter

    bb = zoo.create_backbone("sam", model="samvit_base_patch16", pretrained=False, img_size=64, embed_dim=32, depth=4,
                             num_heads=2, window_size=2, global_attn_indexes=(1, 3), neck_chans=32)
    model = SmpSegmenter(bb, 2, decoder=decoder, channels=64)
    zoo.apply_adapter(model, "lora", rank=2)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    SegLoss()(out, torch.randint(0, 3, (2, 64, 64))).backward()
    assert all(p.grad is not None for p in zoo.adapters_of(model)[0].adapter_parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(ValueError, match="valid: dpt, fpn, unet"):
        SmpSegmenter(bb, 2, decoder="deeplab")
