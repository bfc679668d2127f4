"""task=restoration on the task contract: tiny runs with conv LoRA / CoLoRA / full, the artifact
reproduces the run's PSNR, predictions are PNGs, validation writes side-by-side images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from tasks.metrics.restoration import psnr, ssim
from tests.helpers import compose_config, run_train

TINY = ["experiment=tiny_restore", "trainer.limit_train_batches=2"]


def rebuild(overrides: list[str], out_dir: str):
    """The run's task rebuilt from its config (same seed, same base weights) with its artifact loaded."""
    import lightning as L

    from tasks.runner import build_datamodule, build_task

    cfg = compose_config(overrides)
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(cfg)
    zoo.remove_adapters(task.model)
    zoo.load_adapter(task.model, Path(out_dir) / "adapter")
    dm = build_datamodule(cfg, task)
    dm.prepare_data()
    dm.setup("fit")
    return task.eval(), dm


@pytest.mark.parametrize("adapter", ["lora_conv", "colora_conv"])
def test_tiny_restore_artifact_reproduces_psnr_and_merges(adapter, tmp_path):
    ov = [*TINY, f"adapter={adapter}", "adapter.finetune_steps=3", "adapter.faig_steps=2"] if adapter == "colora_conv" \
        else [*TINY, f"adapter={adapter}"]
    m = run_train(ov, tmp_path)
    assert m["kind"] == "restoration" and m["monitor"]["name"] == "val/psnr" and m["monitor"]["mode"] == "max"
    assert m["val/psnr"] == m["monitor"]["value"] and m["test/psnr"] is not None and 0 < m["val/ssim"] <= 1
    out = Path(m["out_dir"])
    assert sorted(p.name for p in (out / "val_images").glob("*.png"))  # side-by-side strips
    strip = np.asarray(Image.open(next((out / "val_images").glob("*.png"))))
    assert strip.shape[1] == 3 * 32 + 4  # input | output | target of 32-px images with 2-px gaps
    task, dm = rebuild(ov, m["out_dir"])
    x, y, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out_img = task.model(x)
    # the selected checkpoint's validation PSNR, recomputed by hand (the test split is the val split)
    assert psnr(out_img, y).mean().item() == pytest.approx(m["val/psnr"], abs=1e-4)
    assert ssim(out_img, y).mean().item() == pytest.approx(m["val/ssim"], abs=1e-4)
    zoo.merge_adapters(task.model, unload=True)
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), out_img, rtol=1e-4, atol=1e-5)
    if adapter == "colora_conv":
        ranks = json.loads((out / "adapter" / "adapter.json").read_text())["methods"][0]["config"]["ranks"]
        assert ranks and all(r >= 1 for r in ranks.values())


def test_full_finetuning_improves_psnr_and_predict_writes_pngs(tmp_path):
    import lightning as L

    from tasks.runner import build_task

    ov = [*TINY, "adapter=full", "task.max_epochs=3", "trainer.limit_train_batches=4", "task.optimizer.lr=3e-3"]
    m = run_train(ov, tmp_path)
    cfg = compose_config(ov)
    L.seed_everything(cfg.seed, workers=True)
    untrained = build_task(cfg).model.eval()  # the run's initial weights (same seed)
    task, dm = rebuild(ov, m["out_dir"])
    x, y, names = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        at_init = psnr(untrained(x), y).mean().item()
    assert m["val/psnr"] > at_init + 0.5, (m["val/psnr"], at_init)  # training restores better than the init
    task.predict_dir = str(tmp_path / "pred")
    with torch.no_grad():
        res = task.predict_step((x, y, names), 0)
    assert set(res) == {"images"} and res["images"].shape == x.shape
    files = sorted((tmp_path / "pred").glob("*.png"))
    assert [f.stem for f in files] == sorted(names)
    back = torch.from_numpy(np.asarray(Image.open(files[0]))).permute(2, 0, 1).float() / 255
    i = list(names).index(files[0].stem)
    assert (back - res["images"][i]).abs().max() <= 0.5 / 255 + 1e-6


def test_config_errors_are_one_line(tmp_path):
    from tasks.runner import build_task, user_errors

    with pytest.raises(SystemExit, match="error: task=restoration needs an image-to-image backbone"):
        with user_errors():
            build_task(compose_config(["task=restoration", "backbone=vit", "backbone.model=vit_tiny_patch16_224",
                                       "backbone.pretrained=false", "backbone.img_size=32", "adapter=full"]))
    with pytest.raises(SystemExit, match="error: backbone 'nafnet' .* has no site 'q'"):
        with user_errors():
            build_task(compose_config(["experiment=tiny_restore", "adapter=lora"]))
    with pytest.raises(SystemExit, match="error: num_train=999, but only 16 training pairs exist"):
        with user_errors():
            run_train(["experiment=tiny_restore", "adapter=full", "task.num_train=999"], tmp_path)


SIZES = {"a": (40, 56), "b": (36, 36), "c": (21, 70)}  # (height, width): none a multiple of the tile


def write_test_images(folder: Path) -> None:
    from tasks.data import degradations as D
    from tasks.data.procedural import clean_image

    for name, (h, w) in SIZES.items():
        for sub in ("input", "target"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            D.to_pil(clean_image(len(name) + h, max(h, w))[:h, :w]).save(folder / sub / f"{name}.png")


def test_testing_with_write_predictions_writes_one_png_per_input_at_its_size(tmp_path):
    """Tiled inference (tile 16) over images of several sizes; one PNG per input, named and sized like it."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tasks.data.restoration import PairedDataset, find_pairs
    from tasks.restoration import tiled_forward
    from tasks.runner import build_task

    write_test_images(tmp_path / "rain100l" / "test")
    pairs = find_pairs("derain", tmp_path, "test")
    cfg = compose_config([*TINY, "adapter=lora_conv", "task.write_predictions=true", "task.tile=16",
                          "task.tile_overlap=8", f"task.predict_dir={tmp_path / 'pred'}"])
    task = build_task(cfg)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    res = trainer.test(task, dataloaders=DataLoader(PairedDataset(pairs), batch_size=1), verbose=False)[0]
    files = sorted((tmp_path / "pred").glob("*.png"))
    assert [f.stem for f in files] == sorted(SIZES) and res["test/psnr"] > 0
    for f in files:
        saved = np.asarray(Image.open(f))
        assert saved.shape == (*SIZES[f.stem], 3)
    # the PNG is the tiled output, 8-bit
    x, _, name = PairedDataset(pairs)[0]
    with torch.no_grad():
        ref = tiled_forward(task.model.eval(), x[None], 16, 8)[0].clamp(0, 1)
    back = torch.from_numpy(np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"))).permute(2, 0, 1) / 255
    assert (back - ref).abs().max() <= 0.5 / 255 + 1e-6
    # eval.py split=val: validate() writes too, by default under <run dir>/predictions/val
    task.predict_dir = None
    trainer.validate(task, dataloaders=DataLoader(PairedDataset(pairs), batch_size=1), verbose=False)
    assert sorted(f.stem for f in (tmp_path / "predictions" / "val").glob("*.png")) == sorted(SIZES)


@pytest.mark.slow
def test_eval_writes_one_png_per_test_input_at_its_size_with_tiles(tmp_path):
    """``python eval.py artifact=... split=test +task.write_predictions=true +task.tile=16``: tiled
    inference on test images of several sizes (none a multiple of the tile) writes one PNG each."""
    import shutil

    from tests.test_task_contract import evaluate_artifact

    m = run_train([*TINY, "adapter=lora_conv", "task.max_epochs=1", "trainer.limit_train_batches=1"], tmp_path / "run")
    cfg = compose_config(TINY)
    root = tmp_path / "data"
    shutil.copytree(Path(cfg.data.root) / "rain100l" / "train", root / "rain100l" / "train")
    write_test_images(root / "rain100l" / "test")
    out = tmp_path / "pred"
    res = evaluate_artifact(Path(m["out_dir"]) / "adapter", [
        "split=test", "+task.write_predictions=true", "+task.tile=16", "+task.tile_overlap=8", f"+task.predict_dir={out}",
        f"data.root={root}", "++data.generate=false", "++data.eval_batch_size=1"])
    assert res["test/psnr"] is not None
    files = sorted(out.glob("*.png"))
    assert [f.stem for f in files] == sorted(SIZES)
    for f in files:
        assert np.asarray(Image.open(f)).shape == (*SIZES[f.stem], 3)


def test_super_resolution_runs_with_the_sr_metric_convention(tmp_path):
    """task.dataset=sr: bicubic-upsampled LR in, HR out; val PSNR/SSIM on Y with crop_border = scale."""
    ov = [*TINY, "adapter=lora_conv", "task.dataset=sr", "task.scale=2"]
    m = run_train(ov, tmp_path)
    assert m["dataset"] == "sr" and m["val/psnr"] is not None
    task, dm = rebuild(ov, m["out_dir"])
    assert task.metric_cfg == {"crop_border": 2, "y_channel": True, "quantize": True}
    x, y, _ = next(iter(dm.val_dataloader()))
    assert x.shape == y.shape  # the network input is at the HR size
    with torch.no_grad():
        out = task.model(x)
    assert psnr(out, y, crop_border=2, y_channel=True).mean().item() == pytest.approx(m["val/psnr"], abs=1e-4)
    assert psnr(out, y).mean().item() != pytest.approx(m["val/psnr"], abs=1e-3)  # not the RGB number
