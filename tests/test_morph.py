"""MORPH backbone: golden-fixture parity, checkpoint loading, sites, every adapter, fine-tuning levels."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from tests.helpers import assert_refuses, refuses
from zoo.backbones.morph_model import SIZES, config_for, count_parameters, from_reference, to_reference
from zoo.backbones.weights import WeightsUnavailableError
from zoo.sites import SiteError
from tests.conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``../shared`` beside the clone (CI), or ``$ZOO_SHARED_DIR``; worktrees one level deeper also work."""
    env = os.environ.get("ZOO_SHARED_DIR")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared", ROOT.parent.parent / "shared"]:
        if (cand / "reference" / "morph" / "golden_mini.safetensors").is_file():
            return cand
    raise FileNotFoundError("the MORPH golden fixture is not in ../shared/reference/morph; set ZOO_SHARED_DIR")


GOLDEN = shared_dir() / "reference" / "morph"
TINY = dict(model="Ti", pretrained=False, dim=32, depth=2, heads=4, heads_xa=4, mlp_dim=64, max_patches=64, max_ar=2)


def tiny_morph(**kw):
    return zoo.create_backbone("morph", **{**TINY, **kw})


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN / "golden_mini.safetensors")), json.loads((GOLDEN / "golden_mini.json").read_text())


def _variant(golden, variant, tmp_path):
    tensors, meta = golden
    c = meta["cases"][variant]["config"]
    sd = {k.split("/state_dict/")[1]: v for k, v in tensors.items() if k.startswith(f"{variant}/state_dict/")}
    path = tmp_path / f"{variant}.safetensors"
    save_file(sd, str(path))  # reference key names, as a released file would have
    bb = zoo.create_backbone(
        "morph", model=c["model_size"], weights=str(path), dim=c["dim"], depth=c["depth"], heads=c["heads"],
        heads_xa=c["heads_xa"], mlp_dim=c["mlp_dim"], conv_filter=c["conv_filter"], max_ar=c["max_ar"],
        max_patches=c["max_patches"]).eval()
    cases = sorted({k.split("/")[2] for k in tensors if k.startswith(f"{variant}/inputs/")})
    return bb, sd, cases


@pytest.mark.parametrize("variant", ["slin_tslice", "st_bilinear"])
def test_golden_parity_every_case(golden, variant, tmp_path):
    tensors, _ = golden
    bb, _, cases = _variant(golden, variant, tmp_path)
    assert bb.cfg.pos_encoding == variant  # chosen from model_size (L with max_ar > 1 -> bilinear)
    assert len(cases) == 4
    for case in cases:
        with torch.no_grad():
            enc, z, y = bb.forward_all(tensors[f"{variant}/inputs/{case}"])
        for name, out in (("enc", enc), ("z", z), ("y", y)):
            ref = tensors[f"{variant}/outputs/{case}/{name}"]
            assert out.shape == ref.shape, (case, name)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"{variant} {case} {name}")


def test_reference_key_mapping_round_trips(golden, tmp_path):
    bb, sd, _ = _variant(golden, "slin_tslice", tmp_path)
    ours = from_reference(sd)
    assert set(ours) == set(bb.model.state_dict())
    back = to_reference(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_released_pth_format_loads_weights_only(golden, tmp_path):
    # a released file: torch.save({epoch, model_state_dict (DataParallel 'module.' keys), optimizer state})
    bb, sd, cases = _variant(golden, "slin_tslice", tmp_path)
    ckpt = {"epoch": 225, "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    path = tmp_path / "morph-mini.pth"
    torch.save(ckpt, path)
    bb2 = zoo.create_backbone("morph", **{**TINY, "weights": str(path), "depth": 1, "max_patches": 64})
    assert all(torch.equal(a, b) for a, b in zip(bb.model.state_dict().values(), bb2.model.state_dict().values()))
    # a file that needs unpickling arbitrary objects is refused
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "obj": _Unpicklable()}, evil)
    with pytest.raises(WeightsUnavailableError, match="weights-only"):
        zoo.create_backbone("morph", **{**TINY, "weights": str(evil)})
    # the wrong max_ar names the fix
    with pytest.raises(WeightsUnavailableError, match="max_ar"):
        zoo.create_backbone("morph", **{**TINY, "weights": str(path), "depth": 1, "max_ar": 1})


class _Unpicklable:
    pass


def test_offline_pretrained_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="backbone.weights="):
        zoo.create_backbone("morph", model="Ti", pretrained=True)
    with pytest.raises(ValueError, match="no released checkpoint"):
        zoo.create_backbone("morph", model="XL", pretrained=True)
    with pytest.raises(ValueError, match="valid sizes: Ti, S, M, Lt, L, XL"):
        zoo.create_backbone("morph", model="B", pretrained=False)


def test_parameter_counts_match_the_reference():
    # counts from the reference doc (instantiated reference model), max_ar = 1 / 16 for L
    expected = {"Ti": 9_864_408, "S": 32_829_656, "M": 125_602_008, "L": 483_293_400}
    for size, n in expected.items():
        assert count_parameters(config_for(size)) == n
    bb = zoo.create_backbone("morph", model="Ti", pretrained=False)
    assert sum(p.numel() for p in bb.parameters()) == expected["Ti"]
    assert set(SIZES) == {"Ti", "S", "M", "Lt", "L", "XL"}


def test_bad_inputs_are_named():
    bb = tiny_morph()
    with pytest.raises(ValueError, match="W=60"):
        bb(torch.randn(1, 1, 1, 1, 1, 1, 60))
    with pytest.raises(ValueError, match="max_ar=2"):
        bb(torch.randn(1, 3, 1, 1, 1, 1, 64))
    with pytest.raises(ValueError, match="UPTF-7"):
        bb(torch.randn(1, 1, 64))
    with pytest.raises(ValueError, match="F=4"):
        bb(torch.randn(1, 1, 4, 1, 1, 1, 64))


def test_singleton_axes_apply_o_of_v_and_time_attention_needs_frames():
    bb = tiny_morph().eval()
    x1 = torch.randn(2, 1, 1, 1, 1, 1, 64)  # 1-D: D' = H' = 1
    blk = bb.model.transformer_blocks[0].axial_attn
    with torch.no_grad():
        y0 = bb(x1)
        blk.attn_d.o.bias.add_(torch.randn(32))  # a singleton axis still contributes o(v(u))
        assert not torch.allclose(bb(x1), y0)
        y1 = bb(x1)
        blk.attn_t.o.bias.add_(torch.randn(32))  # t = 1: the time attention does not run
        torch.testing.assert_close(bb(x1), y1)
        x2 = torch.randn(2, 2, 1, 1, 1, 1, 64)
        y2 = bb(x2)
        blk.attn_t.o.bias.add_(torch.randn(32))
        assert not torch.allclose(bb(x2), y2)


def test_sites_axes_and_morph_specific_sites():
    bb = tiny_morph().eval()
    assert len(zoo.find_sites(bb, "q")) == 2 * 4  # depth x four axial attentions
    paths = [s.path for s in zoo.find_sites(bb, "v", layers=[1])]
    assert paths == [f"model.transformer_blocks.1.axial_attn.attn_{a}.qkv[v]" for a in "tdhw"]
    bb2 = tiny_morph(axes=["d", "h", "w"])
    assert {s.path.split(".")[-2] for s in zoo.find_sites(bb2, "o")} == {"attn_d", "attn_h", "attn_w"}
    with pytest.raises(ValueError, match="axes"):
        tiny_morph(axes=["x"])
    with pytest.raises(SiteError, match="tokens"):
        zoo.find_sites(bb, "tokens")
    extra = {s.kind: s for s in zoo.find_sites(bb, list(bb.extra_site_kinds))}
    assert isinstance(extra["patch_proj"].module, torch.nn.Linear) and extra["decoder"].path == "model.decoder.linear"
    # LoRA on MORPH-specific Linear sites; refused (clearly) on the Conv3d ones
    x = torch.randn(2, 1, 2, 1, 1, 16, 16)
    y0 = bb(x)
    zoo.apply_adapter(bb, "lora", targets=["q", "v", "patch_proj", "field_q", "field_o", "decoder"], rank=2)
    torch.testing.assert_close(bb(x), y0)  # B = 0
    with pytest.raises(SiteError, match="Conv3d"):
        zoo.apply_adapter(tiny_morph(), "lora", targets=["conv"])


def test_lora_merge_equivalence_on_axial_attention():
    bb = tiny_morph().eval()
    zoo.apply_adapter(bb, "lora", targets=["q", "k", "v", "o", "fc1", "fc2"], rank=2)
    for p in zoo.adapters_of(bb)[0].adapter_parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 2, 1, 1, 1, 8, 16)
    with torch.no_grad():
        y = bb(x)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, atol=1e-5, rtol=1e-5)
    assert set(bb.model.state_dict()) == set(tiny_morph().model.state_dict())


def _colora_ready(model, x, target):
    a = zoo.adapters_of(model)[0]
    a.prepare(model, [(x, target)])
    a.mark_trainable()


ADAPTER_OPTS = {"mhr": {"n_splits": 4}, "miss": {"rank": 8}, "shira": {"rank": 4}, "colora": {"faig_steps": 2, "faig_batches": 1, "finetune_steps": 0}}
REFUSED = {"vpt": "tokens", "q_adapter": "tokens"}


@pytest.mark.parametrize("name", zoo.list_adapters())
def test_every_adapter_attaches_trains_or_refuses(name):
    x = torch.randn(2, 1, 2, 1, 1, 16, 16)
    target = torch.randn(2, 2, 1, 1, 16, 16)
    bb = tiny_morph()
    if refuses(name, "morph"):
        return assert_refuses(bb, name)
    if name in REFUSED:
        before = [p.requires_grad for p in bb.parameters()]
        with pytest.raises(SiteError, match=REFUSED[name]):
            zoo.apply_adapter(bb, name)
        assert not bb.adapters and [p.requires_grad for p in bb.parameters()] == before  # left as it was
        return
    zoo.apply_adapter(bb, name, **ADAPTER_OPTS.get(name, {}))
    if name == "colora":
        _colora_ready(bb, x, target)
    trainable = [(n, p) for n, p in bb.named_parameters() if p.requires_grad]
    if name == "linear":  # head-only: MORPH's head is its own decoder, part of the frozen backbone
        assert not trainable
        return
    assert trainable
    bb.train()
    loss = torch.nn.functional.mse_loss(bb(x), target)
    loss.backward()
    with_grad = [n for n, p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad, f"{name}: no trainable parameter received a gradient"
    frozen = [n for n, p in bb.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


def test_morph_levels_trainable_counts_and_groups():
    # the reference doc's counts for Ti with ranks 16 / 12 (LoRA 647,168 + LN 4,608 + PE 1,048,576 at level 1)
    expected = {1: 1_700_352, 2: 3_014_360, 3: 4_198_616, 4: 9_864_408}
    for level, n in expected.items():  # the reference also wraps the (never-run at max_ar 1) time attention
        bb = zoo.create_backbone("morph", model="Ti", pretrained=False, axes=["t", "d", "h", "w"])
        zoo.apply_adapter(bb, "morph_ft", level=level)
        assert zoo.count_parameters(bb)[0] == n, level
        groups = {g.get("name", "default"): g for g in zoo.param_groups(bb, lr=0.5, weight_decay=0.5)}
        if level < 4:
            assert (groups["lora"]["lr"], groups["lora"]["weight_decay"]) == (1e-3, 0.0)
            assert (groups["norm"]["lr"], groups["pos"]["lr"]) == (1e-4, 1e-4)
            assert sum(p.numel() for p in groups["norm"]["params"]) == 4_608
        if level in (2, 3):
            assert (groups["embed"]["lr"], groups["embed"]["weight_decay"]) == (1e-4, 1e-5)
        if level == 3:
            assert groups["decoder"]["weight_decay"] == 1e-5
        if level == 4:
            assert list(groups) == ["full"] and groups["full"]["lr"] == 1e-4
        assert "default" not in groups  # no parameter falls back to the task's lr
        lora = [m for m in zoo.adapters_of(bb)[0].modules]
        if level < 4:
            assert {m.rank for m in lora} == {16, 12} and {m.scaling for m in lora} == {2.0}
    # default axes at max_ar 1 leave the time attention out: 4 blocks x 4 projections x 2·16·256 fewer
    bb = zoo.create_backbone("morph", model="Ti", pretrained=False)
    assert bb.axes == ["d", "h", "w"]
    zoo.apply_adapter(bb, "morph_ft", level=1)
    assert zoo.count_parameters(bb)[0] == expected[1] - 4 * 4 * 2 * 16 * 256
    with pytest.raises(SiteError, match="backbone=morph"):
        zoo.apply_adapter(tiny_vit(), "morph_ft")


def test_f_adapter_bands_identity_and_refusal():
    from zoo.adapters.f_adapter import band_index, band_widths

    assert band_widths(32, 4, 2.0, 0.5, 2.0) == [52, 34, 22, 16]  # the reference doc's widths
    assert band_widths(32, 4, 2.0, 0.5, 2.0, zero_high_bands=True) == [52, 34, 0, 0]
    idx = band_index((1, 4, 4), 4)
    assert idx[0, 0, 0] == 0 and idx.max() == 3
    bb = tiny_morph().eval()
    x = torch.randn(2, 2, 1, 1, 1, 16, 32)
    y0 = bb(x)
    zoo.apply_adapter(bb, "f_adapter", peft_dim=8)
    torch.testing.assert_close(bb(x), y0)  # zero up-projections
    a = zoo.adapters_of(bb)[0]
    for m in a.modules:
        for band in m.bands:
            if hasattr(band, "up"):
                torch.nn.init.normal_(band.up.weight, std=0.1)
    assert not torch.allclose(bb(x), y0)
    with pytest.raises(SiteError, match="grid"):
        zoo.apply_adapter(tiny_vit(), "f_adapter")
