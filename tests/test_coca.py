"""backbone=coca: open_clip CoCa with the zoo's sites on its vision tower, video fusion, generation."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.backbones.coca import EOT, SOT, CoCaBackbone
from zoo.backbones.weights import WeightsUnavailableError
from zoo.sites import SiteError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32, attentional_pool=True,
                    attn_pooler_heads=2, attn_pooler_queries=16, output_tokens=True),
    text_cfg=dict(context_length=20, vocab_size=49408, width=32, heads=2, layers=1, embed_cls=True, output_tokens=True),
    multimodal_cfg=dict(context_length=20, vocab_size=49408, width=32, heads=2, layers=2, attn_pooler_heads=2),
)


def tiny(seed=0, **kw) -> CoCaBackbone:
    torch.manual_seed(seed)
    return zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained=None, **TINY, **kw).eval()


def video(b=2, t=3, seed=1):
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vision_tower_matches_open_clip_and_keeps_its_names():
    import open_clip

    bb = tiny()
    torch.manual_seed(5)
    ref = open_clip.create_model("coca_ViT-B-32", pretrained=None, **TINY).eval()
    ref.load_state_dict(bb.model.state_dict())  # strict: the explicit attention keeps open_clip's names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        lat, embs = ref._encode_image(x)
        lat2, embs2 = bb.encode_video(x)
    assert torch.allclose(lat, lat2, atol=1e-5) and torch.allclose(embs, embs2, atol=1e-5)
    text = bb.tokenize(["a red square moves left", "a blue circle"])
    with torch.no_grad():  # the decoder's explicit self/cross-attention gives open_clip's logits
        assert torch.allclose(bb.model(x, text)["logits"], ref(x, text)["logits"], atol=1e-5)
    assert bb.block_sites(0).keys() >= {"q", "k", "v", "qkv", "o", "fc1", "fc2", "attn", "mlp", "norm1", "norm2", "tokens"}
    assert all(not p.requires_grad for p in bb.text_parameters())  # text decoder frozen by default


def test_caption_loss_is_open_clip_coca_loss():
    from open_clip.loss import CoCaLoss

    bb = tiny()
    frames, text = torch.randn(2, 3, 32, 32), bb.tokenize(["a red square moves left", "a blue circle"])
    out = bb.model(frames, text)
    _, ref = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
    assert torch.allclose(bb.caption_loss(frames, text), ref, atol=1e-6)
    assert out["labels"].shape == (2, bb.context_length - 1) and text[0, 0] == SOT


@pytest.mark.parametrize("fusion", ["flatten", "pool", "concat"])
def test_video_fusion(fusion):
    bb = tiny(fusion=fusion)
    frame = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        lat1, embs1 = bb.encode_video(frame)
        lat_t1, embs_t1 = bb.encode_video(frame[:, None])
        assert torch.equal(lat1, lat_t1) and torch.equal(embs1, embs_t1)  # an image is a 1-frame video
        v = video(t=4)
        lat, embs = bb.encode_video(v)
        n = embs1.shape[1]
        assert lat.shape == (2, 32) and embs.shape == (2, 4 * n if fusion == "concat" else n, 32)
        if fusion == "pool":  # the mean over frames of the per-frame encodings
            per = [bb.encode_video(v[:, i], normalize=False) for i in range(4)]
            assert torch.allclose(embs, torch.stack([p[1] for p in per]).mean(0), atol=1e-5)
        if fusion == "concat":
            assert torch.allclose(embs[:, n:2 * n], bb.encode_video(v[:, 1])[1], atol=1e-5)
    with pytest.raises(ValueError, match="valid fusions: flatten, pool, concat"):
        tiny(fusion="max")


def test_greedy_generation_is_deterministic_and_per_sample():
    bb = tiny()
    v = video()
    a, b = bb.generate(v, seq_len=12), bb.generate(v, seq_len=12)
    assert torch.equal(a, b) and a[:, 0].eq(SOT).all() and a.shape[1] <= 12
    assert torch.equal(bb.generate(v[1:], seq_len=12)[0, : a.shape[1]], a[1])  # batching does not change a row
    # greedy == top-k sampling with k = 1, whatever the random state
    assert torch.equal(bb.generate(v, "top_k", top_k=1, seq_len=12, generator=torch.Generator().manual_seed(3)), a)
    # top-p with a seed is reproducible; the text round-trips through open_clip's tokenizer
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(bb.generate(v, "top_p", top_p=0.9, seq_len=12, generator=g()),
                       bb.generate(v, "top_p", top_p=0.9, seq_len=12, generator=g()))
    ids = bb.tokenize(["a red square moves left"])
    assert bb.decode(ids) == ["a red square moves left"]
    with pytest.raises(ValueError, match="valid methods: greedy, top_k, top_p, beam_search"):
        bb.generate(v, "nucleus")


def test_min_length_and_repetition_penalty():
    bb = tiny()
    def eot_first(module, args, out):  # EOT is the best token everywhere: only min_seq_len keeps going
        return out.index_add(-1, torch.tensor([EOT]), torch.full((*out.shape[:-1], 1), 1e4))

    bb.model.text_decoder.register_forward_hook(eot_first)
    out = bb.generate(video(), seq_len=12, min_seq_len=4)
    assert out.shape[1] == 5 and out[:, -1].eq(EOT).all()  # 3 forced tokens, then EOT
    bb = tiny()
    rep = bb.generate(video(), seq_len=12, repetition_penalty=1e6)
    body = [t for t in rep[0, 1:].tolist() if t not in (0, EOT)]
    assert len(body) == len(set(body))  # an overwhelming penalty forbids repeats


def test_q_adapter_gate_starts_closed_on_coca():
    bb = tiny()
    v = video()
    text = bb.tokenize(["a red square moves left", "a blue circle moves up"])
    with torch.no_grad():
        ref_logits, _ = bb.caption_logits(v, text)
    ref_ids = bb.generate(v, seq_len=12)
    zoo.apply_adapter(bb, "q_adapter", num_queries=4, proj_dim=8)
    with torch.no_grad():
        logits, _ = bb.caption_logits(v, text)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.equal(bb.generate(v, seq_len=12), ref_ids)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.visual.transformer.resblocks.") for n in trainable)
    loss = bb.caption_loss(v, text)
    loss.backward()  # the closed gate still passes gradient to alpha
    assert all(p.grad is not None for n, p in bb.named_parameters() if p.requires_grad and n.endswith("alpha"))


@pytest.mark.parametrize("name,kw", [("lora", dict(rank=2)), ("adapter", {})])
def test_lora_and_bottleneck_adapter_on_the_same_tower(name, kw):
    bb = tiny()
    v, text = video(), bb.tokenize(["a red square moves left", "a blue circle moves up"])
    with torch.no_grad():
        ref, _ = bb.caption_logits(v, text)
    zoo.apply_adapter(bb, name, **kw)
    with torch.no_grad():
        out, _ = bb.caption_logits(v, text)
    assert torch.allclose(out, ref, atol=1e-5)  # both start as the frozen model (zero-init up / B)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.visual.transformer.resblocks.") for n in trainable)
    bb.caption_loss(v, text).backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)


def test_every_registered_adapter_attaches_or_refuses():
    v = video(t=2)
    for name in zoo.list_adapters():
        bb = tiny()
        text = bb.tokenize(["a red square moves left", "a blue circle moves up"])
        kw = {}
        if name == "colora":  # ranks are normally found by FAIG in prepare(); give them directly here
            probe = zoo.apply_adapter(tiny(), "colora").adapters[0]
            kw = {"ranks": {s.path: 2 for s in probe.targets_found}}
        try:
            zoo.apply_adapter(bb, name, **kw)
        except (SiteError, ValueError) as e:  # a refusal must say why in one line
            assert "\n" not in str(e) and str(e), name
            continue
        trainable = [p for p in bb.parameters() if p.requires_grad]
        if name == "linear":  # a probe trains a task head only: nothing in the captioner
            assert not trainable
            continue
        assert trainable, name
        bb.train()
        bb.caption_loss(v, text).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), name


def test_bad_names_and_offline_weights_are_clear(monkeypatch):
    import open_clip.factory

    with pytest.raises(ValueError, match="valid models: .*coca_ViT-B-32.*coca_ViT-L-14"):
        zoo.create_backbone("coca", model="coca_ViT-X")
    with pytest.raises(ValueError, match="valid tags: .*mscoco_finetuned_laion2b_s13b_b90k"):
        zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained="openai")

    def offline(*a, **k):  # what huggingface_hub raises with HF_HUB_OFFLINE=1 and an empty cache
        raise OSError("We have no connection or you passed local_files_only, cannot find the requested files")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsUnavailableError, match="could not download pretrained weights for open_clip "
                       "coca_ViT-B-32/laion2b_s13b_b90k") as e:
        zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained="laion2b_s13b_b90k")
    assert "backbone.weights=" in str(e.value) and "backbone.pretrained=null" in str(e.value)


@pytest.mark.slow
def test_really_offline_is_clear():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = ("import zoo\ntry:\n zoo.create_backbone('coca', model='coca_ViT-B-32', pretrained='laion2b_s13b_b90k', "
            "cache_dir='/nonexistent_zoo_cache')\nexcept zoo.WeightsUnavailableError as e:\n print('ERR', e)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERR could not download pretrained weights for open_clip coca_ViT-B-32/laion2b_s13b_b90k" in proc.stdout, proc.stderr[-2000:]


def test_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    bb = tiny(seed=3)
    path = tmp_path / "coca.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    again = zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained=None, weights=str(path), **TINY)
    assert again.fingerprint() == bb.fingerprint() and again.weights_tag == "file:coca.safetensors"
    bad = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="is not a CoCa coca_ViT-B-32 state dict"):
        zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained=None, weights=str(bad), **TINY)


# ---------------------------------------------------------------- open_clip's own generate as the oracle
def _oracle() -> None:
    """Our greedy / top-k / top-p equal open_clip's ``CoCa.generate`` token for token; beam search
    through it reads videos (a 1-frame video gives the stock image result)."""
    bb = tiny()
    frames = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    m = bb.model
    common = dict(seq_len=12, min_seq_len=3, repetition_penalty=1.3)
    ours = bb.generate(frames, "greedy", **common)
    ref = m.generate(frames, generation_type="top_k", top_k=1, **common)
    assert torch.equal(ours, ref), (ours, ref)
    for method, kw in (("top_k", dict(top_k=5)), ("top_p", dict(top_p=0.8))):
        torch.manual_seed(11)
        ours = bb.generate(frames, method, temperature=0.7, **kw, **common)
        torch.manual_seed(11)
        ref = m.generate(frames, generation_type=method, temperature=0.7, **kw, **common)
        assert torch.equal(ours, ref), (method, ours, ref)
    beam = bb.generate(frames[:, None], "beam_search", seq_len=12, num_beams=4, num_beam_groups=2, min_seq_len=3)
    ref = m.generate(frames, generation_type="beam_search", seq_len=12, num_beams=4, num_beam_groups=2, min_seq_len=3)
    assert torch.equal(beam, ref) and beam[:, 0].eq(SOT).all()
    assert bb.generate(video(t=3), "beam_search", seq_len=12, num_beams=4, num_beam_groups=2).shape[0] == 2
    print("ORACLE OK")


def test_generation_equals_open_clip_generate():
    from open_clip import coca_model

    if not coca_model._has_transformers:  # `make test` installs the caption extra, which pins it
        pytest.skip("open_clip's generate needs transformers>=4.41,<4.57: pip install -e '.[caption]' "
                    "(test_generation_oracle_side_install runs it from data/caption_tf)")
    _oracle()


@pytest.mark.slow
def test_generation_oracle_side_install():
    """The same oracle in a subprocess that puts transformers 4.56 first on the path, for a venv whose
    transformers is outside open_clip's window: pip install --no-deps --target data/caption_tf
    transformers==4.56.2 huggingface_hub==0.36.0 tokenizers==0.22.1 requests urllib3 idna charset_normalizer certifi"""
    side = ROOT / "data" / "caption_tf"
    if not (side / "transformers").is_dir():
        pytest.skip(f"no side install of transformers 4.56 in {side}")
    env = {**os.environ, "PYTHONPATH": f"{side}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "import tests.test_coca as t; t._oracle()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ORACLE OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_beam_search_without_the_transformers_window_says_so(monkeypatch):
    from open_clip import coca_model

    monkeypatch.setattr(coca_model, "_has_transformers", False)
    with pytest.raises(RuntimeError, match=r"needs transformers>=4.41,<4.57 .*'caption' extra"):
        tiny().generate(video(), "beam_search")


# ---------------------------------------------------------------- decoder tower, temporal embedding, vocab
def test_decoder_tower_sites_are_self_and_cross_attention():
    bb = tiny()
    sites = zoo.sites.find_sites(bb, ["q", "k", "v", "o"], tower="decoder")
    dec = bb.model.text_decoder
    assert len(sites) == 2 * 4 * len(dec.resblocks)  # every layer: self- and cross-attention
    paths = {s.path for s in sites}
    for i in range(len(dec.resblocks)):
        for part in ("resblocks", "cross_attn"):
            assert f"model.text_decoder.{part}.{i}.attn.in_proj[k]" in paths
            assert f"model.text_decoder.{part}.{i}.attn.out_proj" in paths
    d = dec.width
    q = [s for s in sites if s.kind == "v" and s.path.startswith("model.text_decoder.cross_attn.0.")][0]
    assert q.base_module is dec.cross_attn[0].attn.in_proj and q.out_slice == slice(2 * d, 3 * d)
    with pytest.raises(SiteError, match="unknown tower 'text' on backbone 'coca'; valid: visual | decoder | both"):
        zoo.sites.find_sites(bb, ["q"], tower="text")


def test_decoder_lora_is_identity_at_init_and_trains_only_its_factors():
    bb = tiny()
    v, text = video(), bb.tokenize(["a red square moves left", "a blue circle moves up"])
    with torch.no_grad():
        ref, _ = bb.caption_logits(v, text)
    ref_ids = bb.generate(v, seq_len=12)
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "k", "v"], tower="decoder")
    with torch.no_grad():
        out, _ = bb.caption_logits(v, text)
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(bb.generate(v, seq_len=12), ref_ids)
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    n_layers = len(bb.model.text_decoder.resblocks)
    # per attention: one stacked A for q, k, v and a B per slice; self- and cross-attention of every layer
    assert len(trainable) == 4 * 2 * n_layers
    assert all(n.startswith("model.text_decoder.") and "lora" in n.lower() for n in trainable)
    assert not any(p.requires_grad for p in bb.text_parameters())  # the decoder's own weights stay frozen
    bb.train()
    with torch.no_grad():  # open B: the deltas now change the logits, through self- *and* cross-attention
        for n, p in trainable.items():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    loss = bb.caption_loss(v, text)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in bb.named_parameters() if n not in trainable)
    cross_k = [n for n in trainable if ".cross_attn." in n]
    assert cross_k  # the cross-attention's k/v rows read the image tokens


def test_decoder_lora_runs_in_the_captioning_task_with_a_frozen_decoder(tmp_path):
    from tests.helpers import compose_config
    from tasks.runner import build_task

    cfg = compose_config(["experiment=tiny_caption", "adapter=coca_decoder_lora", f"paths.data_dir={tmp_path}/data"],
                         tmp_path / "out")
    task = build_task(cfg)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all(".text_decoder." in n for n in trainable)


@pytest.mark.parametrize("fusion", ["concat", "flatten"])
def test_temporal_embedding_starts_as_before_and_learns_frame_order(fusion):
    base, te = tiny(fusion=fusion), tiny(fusion=fusion, temporal_embedding=4)
    assert te.fingerprint() == base.fingerprint()  # same base weights; the embedding is new
    v, text = video(t=3), base.tokenize(["a red square moves left", "a blue circle moves up"])
    with torch.no_grad():
        assert torch.equal(te.encode_video(v)[1], base.encode_video(v)[1])  # zero-init: exactly the old model
        rev = v.flip(1)
        # without it the captioner is blind to frame order (no positions across frames)
        assert torch.allclose(te.caption_logits(rev, text)[0], te.caption_logits(v, text)[0], atol=1e-5)
    te.caption_loss(v, text).backward()
    assert te.temporal_embedding.grad is not None and te.temporal_embedding.grad[:3].abs().sum() > 0
    assert te.temporal_embedding.grad[3:].abs().sum() == 0  # slot 4 unused by a 3-frame video
    with torch.no_grad():
        te.temporal_embedding.normal_()
        if fusion == "concat":  # e_t on frame t's caption tokens
            n = base.encode_video(v[:, 1])[1].shape[1]
            embs = te.encode_video(v)[1]
            assert torch.allclose(embs[:, n:2 * n], base.encode_video(v[:, 1])[1] + te.temporal_embedding[1], atol=1e-5)
        else:  # e_t on frame t's ViT tokens, before CoCa's attentional pooler
            vis = base.model.visual
            x = vis.transformer(vis._embeds(v.flatten(0, 1))).reshape(2, 3, -1, vis.transformer.width)
            ref = vis._pool((x + te.temporal_embedding[:3, None, :]).flatten(1, 2))[1]
            assert torch.allclose(te.encode_video(v)[1], ref, atol=1e-5)
        assert not torch.allclose(te.caption_logits(rev, text)[0], te.caption_logits(v, text)[0], atol=1e-3)
    with pytest.raises(ValueError, match="5 frames but backbone.temporal_embedding has 4 frame slots"):
        te.encode_video(video(t=5))


def test_temporal_embedding_refused_with_pool():
    with pytest.raises(ValueError, match="temporal_embedding needs backbone.fusion=flatten or concat"):
        tiny(fusion="pool", temporal_embedding=4)


def test_temporal_embedding_trains_with_any_adapter_in_the_task(tmp_path):
    from tests.helpers import compose_config
    from tasks.runner import build_task

    cfg_overrides = ["experiment=tiny_caption", "adapter=linear", "backbone.fusion=concat",
                     "+backbone.temporal_embedding=2", f"paths.data_dir={tmp_path}/data"]
    cfg = compose_config(cfg_overrides, tmp_path / "out")
    torch.manual_seed(0)  # a random tiny CoCa: the same base weights both times
    task = build_task(cfg)
    assert [n for n, p in task.model.named_parameters() if p.requires_grad] == ["backbone.temporal_embedding"]
    # saved with the adapter's tensors, and loaded back into a fresh task (eval.py's init_from path)
    with torch.no_grad():
        task.model.backbone.temporal_embedding.normal_()
    art = zoo.save_adapter(task.model, tmp_path / "art")
    torch.manual_seed(0)
    again = build_task(compose_config([*cfg_overrides, f"+adapter.init_from={art}"], tmp_path / "out2"))
    assert torch.equal(again.model.backbone.temporal_embedding, task.model.backbone.temporal_embedding)


def test_compact_vocab_round_trips_and_generates_in_it():
    import open_clip

    words = ["a", "red", "blue", "square", "moves", "left"]
    bb = tiny(vocab=words)
    table = bb.token_table.tolist()
    assert table[0] == 0 and table[-2:] == [SOT, EOT] and len(table) == len(words) + 3
    assert bb.model.text_decoder.text_projection.shape[1] == len(table) == bb.model.text.token_embedding.num_embeddings
    ids = bb.tokenize(["a red square moves left", "a blue square"])
    bpe = open_clip.tokenize(["a red square moves left", "a blue square"], context_length=bb.context_length)
    assert torch.equal(bb.token_table[ids], bpe)  # compact ids map back to open_clip's exactly
    assert bb.decode(ids) == ["a red square moves left", "a blue square"]
    out = bb.generate(video(), seq_len=8)
    assert out[:, 0].eq(bb.sot_id).all() and int(out.max()) < len(table)
    assert all(isinstance(s, str) for s in bb.decode(out))
    from open_clip import coca_model

    if coca_model._has_transformers:  # open_clip's beam search, told the compact SOT/EOT
        beam = bb.generate(video(), "beam_search", seq_len=8, num_beams=2, num_beam_groups=1, min_seq_len=2)
        assert beam[:, 0].eq(bb.sot_id).all() and int(beam.max()) < len(table)
    with pytest.raises(ValueError, match=r"caption word\(s\) \['green'\] are not in this CoCa's vocabulary"):
        bb.tokenize(["a green square"])
    again = zoo.create_backbone("coca", model="coca_ViT-B-32", pretrained=None, **bb.build_kwargs)
    assert again.token_table.tolist() == table  # the vocab is part of what rebuilds the backbone
