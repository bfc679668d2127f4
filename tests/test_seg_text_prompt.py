"""S-SAM / SALT text prompts (zoo.backbones.sam_text_prompt, SamSegmenter mode=text): class-name embeddings
from the zoo's CLIP text tower or a file, the affine token against its formula, the token reaching
segment_anything's MaskDecoder (oracle), and exactly SALT's trainable set (gradient test)."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.clip_helpers import TINY
from tests.seg_helpers import IMG, NECK, save_reference_sam, tiny_segmenter
from tasks.losses.segmentation import SegLoss
from zoo.backbones.sam_text_prompt import (
    TextPromptEncoder, class_text_embeddings, load_text_embeddings, save_text_embeddings,
)

pytest.importorskip("segment_anything")

CLIP = {"model": "ViT-B-16", "pretrained": None, **TINY}
NAMES = ["liver", "left_kidney"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return save_reference_sam(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def emb():
    torch.manual_seed(0)
    return class_text_embeddings(NAMES, CLIP)


@pytest.fixture(scope="module")
def text(emb, tmp_path_factory):
    """The segmenters' text config: the tiny CLIP's embeddings, precomputed once (CLIP is frozen)."""
    path = save_text_embeddings(tmp_path_factory.mktemp("text") / "names.safetensors", NAMES, emb)
    return {"class_names": NAMES, "embeddings": str(path)}


def test_embeddings_are_the_clip_text_tower_of_the_names(emb):
    torch.manual_seed(0)  # the same random tiny CLIP
    bb = zoo.create_backbone("clip", **CLIP).eval()
    with torch.no_grad():
        want = bb.encode_text(bb.tokenizer(["liver", "left kidney"]))  # "_" -> space, unnormalised
    assert emb.shape == (2, TINY["embed_dim"])
    torch.testing.assert_close(emb, want)


def test_embeddings_file_round_trip_and_bad_files(tmp_path, emb):
    path = save_text_embeddings(tmp_path / "e.safetensors", NAMES, emb)
    torch.testing.assert_close(class_text_embeddings(NAMES, embeddings=path), emb)
    with pytest.raises(ValueError, match=r"holds embeddings of \['liver', 'left_kidney'\], but the class names are"):
        load_text_embeddings(path, ["spleen", "liver"])
    with pytest.raises(FileNotFoundError, match="text embeddings file not found"):
        class_text_embeddings(NAMES, embeddings=tmp_path / "missing.safetensors")


def test_offline_clip_is_one_clear_message(monkeypatch):
    import open_clip

    def no_hub(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", no_hub)
    with pytest.raises(zoo.WeightsUnavailableError, match="could not download pretrained weights for open_clip ViT-B-32/openai"):
        class_text_embeddings(NAMES)  # the reference's ViT-B/32, openai weights


def test_affine_token_formula(emb):
    """Linear -> ReLU -> BatchNorm1d over the batch of (image, name) rows (the reference's affine)."""
    torch.manual_seed(1)
    enc = TextPromptEncoder(emb, out_dim=8)
    tok = enc(3)
    assert tok.shape == (3 * 2, 1, 8)
    h = torch.relu(emb.repeat(3, 1) @ enc.affine[0].weight.T + enc.affine[0].bias)
    want = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)  # BN weight 1, bias 0 at init
    torch.testing.assert_close(tok[:, 0], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tok[:2], tok[2:4])  # image-major: every image gets the same K tokens
    learned = TextPromptEncoder(emb, out_dim=8, learned=True)
    learned.learned.data.normal_()
    with torch.no_grad():
        base = learned.affine(emb)  # batch 1 image: BN over the K names
    torch.testing.assert_close(learned(1)[:, 0], base + learned.learned)  # S-SAM prompttuning: + e_k
    one = TextPromptEncoder(emb[:1], out_dim=8)
    with pytest.raises(ValueError, match="at least 2 .image, class. pairs"):
        one(1)


def test_text_token_reaches_sam_mask_decoder(ref, text):
    """mode=text = segment_anything's MaskDecoder with the token as the only sparse prompt,
    multimask_output=False, SAM's own (loaded) mask tokens; one token changes only its class."""
    sam, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path), mode="text", text=text)
    assert model.decoder.mask_decoder.num_mask_tokens == 4  # SAM's 3 multimask outputs + 1, loaded
    torch.testing.assert_close(model.decoder.mask_decoder.mask_tokens.weight, sam.mask_decoder.mask_tokens.weight)
    model.eval()
    with torch.no_grad():
        model.text.affine[2].running_mean.normal_()
        x = torch.randn(2, 3, IMG, IMG)
        out = model(x)
        assert out.shape == (2, 2, IMG // 4, IMG // 4)
        img = sam.image_encoder(x)
        tokens = model.text(2)
        for i in range(2):
            for k in range(2):
                dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, IMG // 16, IMG // 16)
                want, _ = sam.mask_decoder(image_embeddings=img[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=tokens[i * 2 + k][None], dense_prompt_embeddings=dense,
                                           multimask_output=False)
                torch.testing.assert_close(out[i, k], want[0, 0], atol=1e-4, rtol=1e-4)
        model.text.text_embeddings[1] += 1.0  # another name for class 2 only
        again = model(x)
    torch.testing.assert_close(again[:, 0], out[:, 0])
    assert not torch.allclose(again[:, 1], out[:, 1])


def test_salt_trains_salt_norms_and_text_affine_only(ref, text):
    """experiment=salt_seg's trainable set (the reference main.py, strategy "salt", decoder "none"):
    SALT's scale/shift/X/Y, every LayerNorm named norm* (encoder blocks, decoder transformer) and the
    text affine; the rest of the encoder, the prompt encoder and the decoder stay frozen."""
    sam, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path), mode="text", train_decoder="norms",
                           text=text)
    zoo.apply_adapter(model, "salt", rank=2, r_lora=2, train_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        salt = n.rsplit(".", 1)[-1] in ("scale", "shift", "X", "Y") and n.startswith("backbone.")
        norm = n.startswith(("backbone.model.blocks.", "decoder.mask_decoder.transformer.")) and ".norm" in n
        assert (n in trainable) == (salt or norm or n.startswith("text.affine.")), n
    assert not any(n.startswith(("decoder.prompt_encoder.", "backbone.model.neck.", "backbone.model.patch_embed."))
                   for n in trainable)
    with torch.no_grad():  # move Y off zero so that every SALT factor gets a gradient
        for n, p in model.named_parameters():
            if n.endswith(".Y"):
                p.normal_(0, 0.01)
    x, y = torch.randn(2, 3, IMG, IMG), torch.randint(0, 3, (2, IMG // 4, IMG // 4))
    SegLoss("focal_dice", prompted=True)(model(x), y).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n
    assert sum(".norm1." in n or ".norm2." in n for n in trainable if n.startswith("backbone.")) == 2 * 2 * 2


def test_text_mode_artifact_round_trip(tmp_path, ref, text):
    """The artifact holds the embeddings and the BatchNorm statistics (no CLIP needed to reload)."""
    sam, path = ref
    model = tiny_segmenter(num_classes=2, weights=str(path), mode="text", train_decoder="norms",
                           text=text)
    zoo.apply_adapter(model, "salt", rank=2, r_lora=2, train_norms=True)
    x = torch.randn(2, 3, IMG, IMG)
    model(x)  # one training forward: BatchNorm running statistics move
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    zoo.save_adapter(model.eval(), tmp_path / "art")
    from tests.seg_helpers import tiny_sam_backbone
    from zoo.backbones.sam_decoder import SamSegmenter

    fresh = SamSegmenter.from_spec(tiny_sam_backbone(str(path)), model.head_spec())
    assert fresh.head_spec() == model.head_spec() and fresh.head_spec()["text"] == {"dim": TINY["embed_dim"],
                                                                                    "learned": False}
    zoo.load_adapter(fresh, tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
    assert NECK == model.text.affine[0].out_features


def test_text_mode_needs_the_class_names(ref):
    _, path = ref
    with pytest.raises(ValueError, match="sam.mode=text needs the 2 class names"):
        tiny_segmenter(num_classes=2, weights=str(path), mode="text", text={"clip": CLIP})
