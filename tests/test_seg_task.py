"""task=segmentation end to end (tiny SAM, generated data): metrics.json, PNG predictions, Synapse
volume evaluation, SAMed_s decoder LoRA, the recipes' configs, bad-config lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zoo
from tests.helpers import CONF, compose_config, refuses, run_train

pytest.importorskip("segment_anything")
pytest.importorskip("tasks.base", reason="task=segmentation is built on the task contract (issue 9)")


def _run(tmp_path, *extra):
    return run_train(["experiment=tiny_seg", f"paths.data_dir={tmp_path / 'data'}", *extra], tmp_path)


def test_tiny_seg_run_writes_metrics_and_masks(tmp_path):
    m = _run(tmp_path, "adapter=lora")
    out = Path(m["out_dir"])
    assert m["kind"] == "segmentation" and m["monitor"]["name"] == "val/dice" and m["monitor"]["mode"] == "max"
    assert [c["key"] for c in m["columns"]] == ["val/dice", "test/dice", "test/iou", "test/hd95"]
    assert 0.0 <= m["val/dice"] <= 1.0 and 0.0 <= m["test/dice"] <= 1.0 and m["test/hd95"] >= 0.0
    pngs = sorted((out / "predictions" / "test").glob("*.png"))
    assert len(pngs) == 16  # the generated test split
    lab = np.asarray(Image.open(pngs[0]))
    assert lab.shape == (64, 64) and lab.max() <= 3
    assert len(list((out / "predictions" / "test" / "overlays").glob("*.png"))) == 16
    assert list((out / "overlays").glob("epoch_*/*.png"))
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["head"]["type"] == "sam_mask_decoder" and meta["head"]["num_classes"] == 3
    assert meta["task"]["kind"] == "segmentation"


@pytest.mark.parametrize("extra", [
    ["task.sam.mode=prompted", "task.prompt=box", "task.prompt_jitter=2", "task.loss.kind=focal_dice"],
    ["task.head=smp_dpt", "task.grad_checkpointing=true"],
])
def test_prompted_mode_and_smp_head_train(tmp_path, extra):
    m = _run(tmp_path, "adapter=lora", *extra)
    # (test/hd95 is None when every prediction is empty: undefined under the standard convention)
    assert m["val/dice"] is not None and m["test/dice"] is not None and "test/hd95" in m


def test_synapse_volume_eval_and_samed_s(tmp_path):
    m = _run(tmp_path, "adapter=lora", "adapter.rank=4", "adapter.alpha=4", "data.layout=synapse",
             "task.metric_convention=samed", "task.scheduler.name=poly", "task.scheduler.warmup_iters=2",
             "task.sam.train_decoder=no_transformer",
             "task.decoder_adapter={name: lora, rank: 4, alpha: 4, targets: [q, v]}")
    out = Path(m["out_dir"])
    assert m["dataset"] == "synapse" and m["test/dice"] is not None
    # test volumes: 2 generated cases of 6 slices, written slice by slice at the original size
    pngs = sorted((out / "predictions" / "test").glob("case*_slice*.png"))
    assert len(pngs) == 12 and pngs[0].name == "case0004_slice000.png"
    names = json.loads((out / "adapter" / "adapter.json").read_text())["tensors"]
    assert any("transformer.layers.0.self_attn.q_proj.lora_A" in n for n in names)
    assert not any(n.endswith("transformer.layers.0.self_attn.q_proj.base.weight") for n in names)
    assert any("mask_tokens" in n for n in names)  # the rest of the decoder trains (SAMed_s)


def test_synapse_volumes_in_prompted_mode(tmp_path):
    """Volume evaluation with prompts from each slice's ground truth (box per present class)."""
    m = _run(tmp_path, "adapter=lora", "data.layout=synapse", "task.sam.mode=prompted", "task.prompt=box",
             "task.loss.kind=focal_dice")
    out = Path(m["out_dir"])
    assert m["dataset"] == "synapse" and m["test/dice"] is not None and 0.0 <= m["test/dice"] <= 1.0
    assert len(sorted((out / "predictions" / "test").glob("case*_slice*.png"))) == 12


def test_text_prompted_salt_runs_from_an_embeddings_file(tmp_path):
    """sam.mode=text end to end with precomputed class-name embeddings (no CLIP at train time)."""
    import torch

    from zoo.backbones.sam_text_prompt import save_text_embeddings

    names = ["vessel", "organ_a", "organ_b"]
    emb = save_text_embeddings(tmp_path / "names.safetensors", names, torch.randn(3, 16))
    m = _run(tmp_path, "adapter=salt", "adapter.rank=2", "adapter.r_lora=2", "adapter.train_norms=true",
             "task.sam.mode=text", "task.sam.train_decoder=norms", f"task.class_names=[{','.join(names)}]",
             f"task.sam.text.embeddings={emb}", "task.loss.kind=focal_dice", "task.train_encoder=[pos_embed]")
    meta = json.loads((Path(m["out_dir"]) / "adapter" / "adapter.json").read_text())
    assert meta["head"]["mode"] == "text" and meta["head"]["text"] == {"dim": 16, "learned": False}
    assert "text.text_embeddings" in meta["tensors"] and "text.affine.0.weight" in meta["tensors"]
    assert any(".norm1.weight" in n for n in meta["tensors"]) and m["test/dice"] is not None
    assert "backbone.model.pos_embed" in meta["tensors"]
    with pytest.raises(Exception, match="embeds the class names"):
        _run(tmp_path, "adapter=linear", "task.sam.mode=text")


def test_samed_lora_b_moves_with_its_own_encoder_lr(tmp_path):
    """The quickstart's diagnostic: LoRA's B (zero at init) leaves zero during task=segmentation
    training, and task.optimizer.encoder_lr puts exactly the encoder's trainable tensors in groups
    with that lr (the decoder keeps task.optimizer.lr)."""
    from safetensors.torch import load_file

    from tasks.runner import build_task

    m = _run(tmp_path, "adapter=samed_lora", "task.optimizer.encoder_lr=0.01")
    state = load_file(str(Path(m["out_dir"]) / "adapter" / "adapter.safetensors"))
    bs = {k: v for k, v in state.items() if "lora_B" in k}
    assert len(bs) == 2 * 2 and all(v.abs().max() > 0 for v in bs.values())  # q and v of both blocks
    cfg = compose_config(["experiment=tiny_seg", "adapter=samed_lora", "task.optimizer.lr=0.002",
                          "task.optimizer.encoder_lr=0.01", f"paths.data_dir={tmp_path / 'data'}"])
    task = build_task(cfg)
    groups = task.param_groups(0.002, 1e-4)
    enc = {id(p) for p in task.model.backbone.parameters()}
    seen = 0
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == (0.01 if id(p) in enc else 0.002)
            seen += 1
    assert seen == sum(p.requires_grad for p in task.model.parameters())
    assert sum(len(g["params"]) for g in groups if g["lr"] == 0.01) == 2 * 3  # lora_A + B_q + B_v per block


def test_validation_overlays_go_to_tensorboard(tmp_path):
    """logger=tensorboard: the overlays are TensorBoard images (one per validation epoch), no PNG files."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    m = _run(tmp_path, "adapter=lora", "logger=tensorboard", "task.predict_split=null")
    out = Path(m["out_dir"])
    assert not (out / "overlays").exists()
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={IMAGES: 0}).Reload()
    assert sorted(acc.Tags()["images"]) == ["val/overlay/00", "val/overlay/01"]  # task.overlays=2 (tiny_seg)
    imgs = acc.Images("val/overlay/00")
    assert len(imgs) >= 2 and imgs[0].width == imgs[0].height == 64  # sanity check + 2 epochs


def test_recipes_compose():
    samed = compose_config(["experiment=samed_synapse"])
    assert samed.adapter.name == "lora" and samed.adapter.rank == 4 and samed.adapter.alpha == 4
    assert list(samed.adapter.targets) == ["q", "v"] and samed.backbone.img_size == 512
    o, s = samed.task.optimizer, samed.task.scheduler
    assert (o.lr, o.weight_decay, s.name, s.warmup_iters, s.power) == (5e-3, 0.1, "poly", 250, 0.9)
    assert samed.task.num_classes == 8 and samed.task.loss.kind == "samed" and samed.task.loss.dice_weight == 0.8
    assert samed.data.layout == "synapse" and samed.data.normalize == "none"
    salt = compose_config(["experiment=salt_seg"])
    assert salt.adapter.name == "salt" and list(salt.adapter.targets) == ["qkv", "o", "fc1", "fc2"]
    assert (salt.task.optimizer.lr, salt.task.optimizer.weight_decay) == (1e-4, 1e-2)
    assert salt.task.loss.kind == "focal_dice"
    assert (salt.task.loss.focal_alpha, salt.task.loss.focal_gamma) == (0.75, 3.0)  # SALT's utils.py
    assert salt.task.sam.mode == "text" and salt.task.sam.train_decoder == "norms" and salt.adapter.train_norms
    assert dict(salt.task.sam.text.clip) == {"model": "ViT-B-32", "pretrained": "openai"}  # the reference's CLIP
    assert list(salt.task.train_encoder) == ["pos_embed"]


def test_samed_recipe_runs_tiny(tmp_path):
    """experiment=samed_synapse itself, shrunk to the tiny SAM and generated Synapse volumes."""
    m = run_train(["experiment=samed_synapse", f"paths.data_dir={tmp_path / 'data'}", "backbone.pretrained=false",
                   "backbone.img_size=64", "+backbone.kwargs={embed_dim: 32, depth: 2, num_heads: 2, window_size: 2, "
                   "global_attn_indexes: [1], neck_chans: 32}", "task.num_classes=3", "task.class_names=[a, b, c]",
                   "+task.sam.decoder={mlp_dim: 64, num_heads: 2, iou_head_hidden_dim: 32}", "task.max_epochs=1",
                   "task.scheduler.warmup_iters=1", "+trainer.limit_train_batches=2", "callbacks=none",
                   "trainer.enable_progress_bar=false"], tmp_path)
    assert m["kind"] == "segmentation" and m["test/dice"] is not None and m["adapter"] == "lora"


@pytest.mark.parametrize("override,msg", [
    (["task.head=unet"], "task.head='unet'; valid: sam, smp_dpt, smp_fpn, smp_unet"),
    (["task.sam.mode=interactive"], "unknown SAM mode 'interactive'"),
    (["data.layout=coco"], "data.layout='coco'; valid"),
    (["task.loss.kind=bce"], "unknown segmentation loss 'bce'"),
    (["task.train_encoder=[posembed]"], "no encoder parameter name contains 'posembed'"),
])
def test_bad_config_lines(tmp_path, override, msg):
    with pytest.raises(Exception) as info:
        _run(tmp_path, "adapter=lora", *override)
    cause = info.value  # Hydra wraps the task's error; the runner prints the innermost ValueError
    while not isinstance(cause, ValueError) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, ValueError) and msg in str(cause)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in zoo.list_adapters() if (Path(CONF) / "adapter" / f"{n}.yaml").is_file()])
def test_every_adapter_trains_on_task_segmentation(tmp_path, name):
    """Every adapter selectable as adapter=<name> (morph_ft has no config: MORPH's own recipes set it)."""
    opts = {"mhr": ["adapter.n_splits=4"], "colora": ["adapter.finetune_steps=1", "adapter.faig_steps=2"],
            "miss": ["adapter.rank=8"], "shira": ["adapter.rank=4"]}.get(name, [])  # ranks that fit width 32
    if name in ("vpt", "q_adapter") or refuses(name, "sam"):  # token methods; adapters for other backbones
        with pytest.raises(Exception) as info:
            _run(tmp_path, f"adapter={name}")
        cause = info.value  # under Hydra's InstantiationException: the adapter's SiteError
        while not isinstance(cause, zoo.SiteError) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        assert isinstance(cause, zoo.SiteError)
        assert "tokens" in str(cause) if name in ("vpt", "q_adapter") else "sam" in str(cause)
        return
    m = _run(tmp_path, f"adapter={name}", *opts)
    assert m["val/dice"] is not None
