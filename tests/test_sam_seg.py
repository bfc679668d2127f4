"""SAM encoder + mask decoder against segment_anything's own Sam (oracle), position resampling,
decoder sites (tower=decoder) and every adapter on the SAM segmenter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_refuses, refuses
from tests.seg_helpers import DECODER, IMG, build_reference_sam, save_reference_sam, tiny_sam_backbone, tiny_segmenter
from zoo.backbones.sam import resample_rel_pos
from zoo.backbones.sam_decoder import SamSegmenter, prompts_from_mask

pytest.importorskip("segment_anything")


def _sam_input(sam, x255):
    """What Sam.preprocess feeds its encoder (normalise; no padding at the native size)."""
    return (x255 - sam.pixel_mean) / sam.pixel_std


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return save_reference_sam(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


def test_encoder_equals_segment_anything(ref):
    sam, path = ref
    bb = tiny_sam_backbone(str(path))
    x = torch.rand(2, 3, IMG, IMG) * 255
    with torch.no_grad():
        want = sam.image_encoder(_sam_input(sam, x))
        got = bb.forward_features(_sam_input(sam, x))
    assert got.shape == want.shape == (2, 32, IMG // 16, IMG // 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prompted_masks_equal_segment_anything(ref):
    sam, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path), mode="prompted").eval()
    x = torch.rand(2, 3, IMG, IMG) * 255
    gt = torch.zeros(2, IMG, IMG, dtype=torch.long)
    gt[0, 10:30, 12:40] = 1
    gt[0, 40:60, 40:60] = 2
    gt[1, 5:20, 30:50] = 2
    for kind in ("point", "box"):
        points, boxes, present = prompts_from_mask(gt, 2, kind=kind)
        with torch.no_grad():
            ours = model(_sam_input(sam, x), points=points, boxes=boxes, present=present)
            for i in range(2):
                ks = present[i].nonzero().flatten()
                item = {"image": x[i], "original_size": (IMG, IMG)}
                if points is not None:
                    item["point_coords"], item["point_labels"] = points[0][i, ks], points[1][i, ks]
                if boxes is not None:
                    item["boxes"] = boxes[i, ks]
                out = sam([item], multimask_output=False)[0]
                torch.testing.assert_close(ours[i, ks], out["low_res_logits"][:, 0], atol=1e-4, rtol=1e-4)
                # the thresholded masks at the input size agree too
                up = F.interpolate(ours[i, ks][:, None], size=(IMG, IMG), mode="bilinear", align_corners=False) > 0
                assert torch.equal(up, out["masks"])
        assert (ours[~present] == -20.0).all()  # no prompt, no mask


def test_semantic_mode_equals_unprompted_decoder(ref):
    """SAMed's forward: no prompts, all mask tokens returned (decoder heads kept here to compare)."""
    sam, path = ref
    model = tiny_segmenter(num_classes=3, weights=str(path), mode="semantic", reinit_heads=False).eval()
    x = torch.rand(2, 3, IMG, IMG) * 255
    with torch.no_grad():
        ours = model(_sam_input(sam, x))
        emb = sam.image_encoder(_sam_input(sam, x))
        sparse, dense = sam.prompt_encoder(None, None, None)
        want = torch.cat([sam.mask_decoder.predict_masks(emb[i:i + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense)[0]
                          for i in range(2)])
    assert ours.shape == (2, 4, IMG // 4, IMG // 4)  # K+1 = 4 channels at a quarter of the input
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_samed_reinit_and_k_plus_one_tokens(ref):
    sam, path = ref
    model = tiny_segmenter(num_classes=8, weights=str(path))  # semantic: 9 mask tokens, heads re-initialised
    md = model.decoder.mask_decoder
    assert md.mask_tokens.weight.shape == (9, 32) and len(md.output_hypernetworks_mlps) == 9
    torch.testing.assert_close(md.transformer.layers[0].self_attn.q_proj.weight,
                               sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(model.decoder.prompt_encoder.no_mask_embed.weight, sam.prompt_encoder.no_mask_embed.weight)
    assert model(torch.randn(2, 3, IMG, IMG)).shape == (2, 9, 16, 16)
    assert all(p.requires_grad for p in model.decoder.parameters())  # SAMed: decoder + prompt encoder train


def test_decoder_file_that_does_not_fit(tmp_path, ref):
    _, path = ref
    state = torch.load(path, weights_only=True)
    bad = {k: (v[..., :16] if k.endswith("q_proj.weight") else v) for k, v in state.items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(zoo.WeightsUnavailableError, match="decoder does not match"):
        SamSegmenter(tiny_sam_backbone(str(path)), 2, decoder=dict(DECODER), decoder_weights=str(tmp_path / "bad.pth"))
    enc_only = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    torch.save(enc_only, tmp_path / "enc.pth")
    with pytest.raises(zoo.WeightsUnavailableError, match="no prompt_encoder"):
        SamSegmenter(tiny_sam_backbone(str(path)), 2, decoder=dict(DECODER), decoder_weights=str(tmp_path / "enc.pth"))
    with pytest.raises(zoo.WeightsUnavailableError, match="does not fit this SAM encoder"):
        zoo.create_backbone("sam", model="samvit_base_patch16", pretrained=False, weights=str(path), img_size=IMG,
                            embed_dim=48, depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=32)


def test_position_resampling(ref):
    """Native size: unchanged. Other sizes: SAMed's formulas (bilinear grid, global rel-pos to 2G-1)."""
    sam, path = ref
    state = sam.state_dict()
    native = tiny_sam_backbone(str(path))
    torch.testing.assert_close(native.model.pos_embed, state["image_encoder.pos_embed"], rtol=0, atol=0)
    torch.testing.assert_close(native.model.blocks[1].attn.rel_pos_h, state["image_encoder.blocks.1.attn.rel_pos_h"],
                               rtol=0, atol=0)
    big = tiny_sam_backbone(str(path), img=128)  # 8x8 grid
    pos = state["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    want = F.interpolate(pos, (8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(big.model.pos_embed, want)
    rel = state["image_encoder.blocks.1.attn.rel_pos_h"]  # global block: 7 -> 15
    want_rel = F.interpolate(rel[None, None], (15, rel.shape[1]), mode="bilinear", align_corners=False)[0, 0]
    assert big.model.blocks[1].attn.rel_pos_h.shape == (15, rel.shape[1])
    torch.testing.assert_close(big.model.blocks[1].attn.rel_pos_h, want_rel)
    torch.testing.assert_close(big.model.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    assert resample_rel_pos(rel, rel.shape[0]) is rel
    assert big.forward_features(torch.randn(1, 3, 128, 128)).shape == (1, 32, 8, 8)
    seg = tiny_segmenter(2, weights=str(path), img=128)
    assert seg(torch.randn(1, 3, 128, 128)).shape == (1, 3, 32, 32)


def test_decoder_tower_lora_is_samed_s(ref):
    """tower=decoder LoRA(q, v) wraps q/v of all three attentions of both decoder layers; the
    transformer stays frozen (train_decoder=no_transformer) and starts as the identity."""
    _, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path), train_decoder="no_transformer")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = model(x)
    zoo.apply_adapter(model, "lora", rank=4, alpha=4, targets=["q", "v"])
    zoo.apply_adapter(model, "lora", rank=4, alpha=4, targets=["q", "v"], tower="decoder")
    wrapped = [n for n, m in model.decoder.named_modules() if type(m).__name__ == "LoRALinear"]
    assert len(wrapped) == 2 * 3 * 2  # 2 layers x 3 attentions x (q, v)
    assert "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj" in wrapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # B = 0 at init
    trans = model.decoder.mask_decoder.transformer
    assert not trans.layers[0].mlp.lin1.weight.requires_grad
    assert model.decoder.mask_decoder.mask_tokens.weight.requires_grad
    model(x).sum().backward()
    lora = [p for n, p in model.named_parameters() if "transformer" in n and p.requires_grad]
    assert lora and all(p.grad is not None for p in lora)
    assert zoo.adapters_of(model)[1].config["tower"] == "decoder"
    # the artifact records the tower; loading re-attaches both adapters where they were
    with torch.no_grad():
        for a in zoo.adapters_of(model):
            for p in a.adapter_parameters():
                p.normal_(0, 0.02)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        zoo.save_adapter(model.eval(), d)
        fresh = tiny_segmenter(num_classes=2, weights=str(path), train_decoder="no_transformer").eval()
        zoo.load_adapter(fresh, d)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x))
    assert [a.tower for a in zoo.adapters_of(fresh)] == [None, "decoder"]


def test_tower_errors(ref):
    _, path = ref
    with pytest.raises(ValueError, match="unknown tower 'text'"):
        zoo.apply_adapter(tiny_segmenter(2), "lora", tower="text")
    with pytest.raises(ValueError, match="has only its backbone"):
        zoo.apply_adapter(tiny_sam_backbone(), "lora", tower="decoder")
    with pytest.raises(zoo.SiteError, match="no site 'qkv'"):
        zoo.apply_adapter(tiny_segmenter(2), "salt", tower="decoder")


@pytest.mark.parametrize("name,trains", [("full", lambda n: True), ("bitfit", lambda n: n.endswith(".bias"))])
def test_base_parameter_methods_on_the_decoder_tower(name, trains):
    """full / bitfit with tower=decoder train exactly the mask decoder's own parameters of their kind (the
    decoder view takes no tower argument: passing 'decoder' on to it used to fail), the encoder stays frozen."""
    model = tiny_segmenter(num_classes=2)
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    zoo.apply_adapter(model, name, tower="decoder")
    a = zoo.adapters_of(model)[0]
    view = {id(p) for p in a.backbone.parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    want = {id(p) for n, p in a.backbone.named_parameters() if trains(n)}
    got = {id(p) for p in model.parameters() if p.requires_grad}
    assert want and got == want and want <= view


# every registered adapter on the SAM segmenter (encoder tower): attach + forward + backward, or a
# refusal naming why (SAM's tokens are NHWC, so prompt/token methods have no 'tokens' site)
TOKEN_METHODS = {"vpt", "q_adapter"}


@pytest.mark.parametrize("name", zoo.list_adapters())
def test_every_adapter_on_sam_segmenter(name):
    model = tiny_segmenter(num_classes=2)
    x = torch.randn(2, 3, IMG, IMG)
    if name in TOKEN_METHODS:
        with pytest.raises(zoo.SiteError, match="tokens"):
            zoo.apply_adapter(model, name)
        return
    if refuses(name, "sam"):
        return assert_refuses(model, name)
    opts = {"mask_tuning": {"targets": ["q", "v"]}, "mhr": {"n_splits": 4}, "miss": {"rank": 8}, "shira": {"rank": 4},
            "colora": {"finetune_steps": 1, "faig_steps": 2, "faig_batches": 1}}.get(name, {})
    zoo.apply_adapter(model, name, **opts)
    # data-driven methods (CoLoRA) run their stage on a segmentation batch: (image, index mask)
    zoo.prepare_adapters(model, [(x, torch.randint(0, 3, (2, IMG // 4, IMG // 4)))])
    out = model(x)
    assert out.shape == (2, 3, IMG // 4, IMG // 4) and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    enc_train = [p for p in model.backbone.parameters() if p.requires_grad]
    if name != "linear":
        assert enc_train and any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc_train), name
    assert any(p.grad is not None for p in model.decoder.parameters())


def test_samed_artifact_holds_lora_and_decoder_only(tmp_path, ref):
    """SAMed's checkpoint: LoRA + prompt-encoder/mask-decoder tensors, no encoder weights; it loads
    onto a fresh SAM built from the same file and reproduces the outputs."""
    from tasks.losses.segmentation import SegLoss

    _, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path))
    zoo.apply_adapter(model, "lora", rank=4, alpha=4, targets=["q", "v"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 3, IMG, IMG), torch.randint(0, 3, (2, IMG // 4, IMG // 4))
    for _ in range(2):
        opt.zero_grad()
        SegLoss("samed")(model(x), y).backward()
        opt.step()
    zoo.save_adapter(model.eval(), tmp_path / "art")
    names = list(zoo.read_adapter_config(tmp_path / "art")["tensors"])
    assert names and all(n.startswith(("decoder.prompt_encoder.", "decoder.mask_decoder.")) or "lora_" in n for n in names)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in names)
    assert any("mask_tokens" in n for n in names) and any("no_mask_embed" in n for n in names)
    fresh = tiny_segmenter(num_classes=2, weights=str(path)).eval()
    zoo.load_adapter(fresh, tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    other = tiny_segmenter(num_classes=3, weights=str(path))
    with pytest.raises(zoo.AdapterMismatchError, match="head"):
        zoo.load_adapter(other, tmp_path / "art")


def test_activation_checkpointing_keeps_results():
    """task.grad_checkpointing: timm's checkpoint_seq over the encoder blocks; same outputs and grads."""
    torch.manual_seed(0)
    a = tiny_segmenter(num_classes=2)
    b = tiny_segmenter(num_classes=2)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        zoo.apply_adapter(m, "lora", rank=2)
    b.load_state_dict(a.state_dict())
    b.backbone.model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, IMG, IMG)
    la, lb = a(x).square().mean(), b(x).square().mean()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    ga = [p.grad for p in a.parameters() if p.requires_grad]
    gb = [p.grad for p in b.parameters() if p.requires_grad]
    assert len(ga) == len(gb) > 0
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2)


def test_smp_unet_head_on_a_simple_feature_pyramid(ref):
    """head=smp_unet: ViTDet's simple feature pyramid from the last block (strides 2..32) feeding
    smp's UnetDecoder; full-resolution logits; gradients reach the encoder adapter."""
    from timm.layers import LayerNorm2d

    from zoo.heads.smp import SimpleFeaturePyramid, SmpSegmenter

    torch.manual_seed(0)
    fpn = SimpleFeaturePyramid(32, 16)
    f = torch.randn(2, 32, 4, 4)
    levels = fpn(f)
    assert [tuple(t.shape) for t in levels] == [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    # stride 16 is the map itself and stride 32 its 2x2 max-pool, each through 1x1 conv+LN, 3x3 conv+LN
    assert [type(m) for m in fpn.stages[3]] == [torch.nn.Conv2d, LayerNorm2d, torch.nn.Conv2d, LayerNorm2d]
    torch.testing.assert_close(levels[4], fpn.stages[4][1:](F.max_pool2d(f, 2)))
    assert [type(m) for m in fpn.stages[1]] == [torch.nn.ConvTranspose2d, LayerNorm2d, torch.nn.GELU, torch.nn.ConvTranspose2d,
                                               torch.nn.Conv2d, LayerNorm2d, torch.nn.Conv2d, LayerNorm2d]
    _, path = ref
    bb = tiny_sam_backbone(str(path))
    model = SmpSegmenter(bb, 2, decoder="unet", channels=16)
    assert model.indices == [bb.depth - 1]
    zoo.apply_adapter(model, "lora", rank=2)
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    assert out.shape == (2, 3, IMG, IMG)
    out.square().mean().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert head and all(p.requires_grad and p.grad is not None for p in head)
    with pytest.raises(ValueError, match="reads 1 block output"):
        SmpSegmenter(tiny_sam_backbone(str(path)), 2, decoder="unet", indices=[0, 1])


@pytest.mark.parametrize("head", ["sam", "smp_dpt", "smp_unet"])
def test_head_from_spec_rebuilds_the_same_shapes(ref, head):
    from zoo.heads.smp import SmpSegmenter

    _, path = ref
    if head == "sam":
        model = tiny_segmenter(num_classes=2, weights=str(path), train_decoder="no_transformer")
        again = SamSegmenter.from_spec(tiny_sam_backbone(str(path)), model.head_spec())
    else:
        model = SmpSegmenter(tiny_sam_backbone(str(path)), 2, decoder=head.split("_")[1], channels=64)
        again = SmpSegmenter.from_spec(tiny_sam_backbone(str(path)), model.head_spec())
    assert again.head_spec() == model.head_spec()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(again) == trainable(model)


def test_sam_checkpoint_round_trip_into_segment_anything(tmp_path, ref):
    """Our SAM-format export loads strictly into segment_anything's Sam and gives the same masks."""
    from zoo.backbones.sam_decoder import save_sam_checkpoint

    sam, path = ref
    ours = tiny_segmenter(num_classes=3, weights=str(path), mode="semantic", reinit_heads=False).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01)
    save_sam_checkpoint(ours, tmp_path / "out.pth")
    other = build_reference_sam(seed=1)
    other.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, IMG, IMG) * 255
    with torch.no_grad():
        emb = other.image_encoder(_sam_input(other, x))
        sparse, dense = other.prompt_encoder(None, None, None)
        want = other.mask_decoder.predict_masks(emb, other.prompt_encoder.get_dense_pe(), sparse, dense)[0]
        torch.testing.assert_close(ours(_sam_input(other, x)), want, atol=1e-4, rtol=1e-4)
    zoo.apply_adapter(ours, "lora")
    with pytest.raises(ValueError, match="merge or remove"):
        save_sam_checkpoint(ours, tmp_path / "x.pth")
