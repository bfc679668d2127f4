"""Small helpers shared by the notebooks: settings, the embedded data, a plain-PyTorch training loop.

Notebooks 01-04 train with ``zoo`` alone (plain PyTorch and the loop below, no Lightning or
Hydra), so they show the library the way a user would call it from their own code. The modality
notebooks (05+) run the project's own tasks (``tasks/``, Lightning) from the Hydra configs
``train.py`` reads: :func:`choose_config`, :func:`build`, :func:`train` (they import Lightning and
Hydra lazily, so 01-04 never load them through nbkit).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402

SMALL = os.environ.get("ZOO_NB_SMALL", "0") not in ("", "0")  # the test suite runs the notebooks small
IMG = 32
TINY_VIT = dict(model="vit_tiny_patch16_224", img_size=IMG, depth=2 if SMALL else 4)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# OMP_NUM_THREADS, when set, wins (the test suite sets 1): more threads than free cores make every
# step many times slower on a shared machine (issue #22 measured twentyfold)
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


class ToySprites(Dataset):
    """A stand-in for dSprites-location (16 classes): a white square whose column bin is the label.

    Used only when the project's embedded VTAB-style data (``tasks.data.synthetic``) is missing.
    """

    num_classes = 16

    def __init__(self, n: int, split: str = "train"):
        g = torch.Generator().manual_seed({"train": 0, "test": 1}[split])
        self.labels = torch.randint(0, 16, (n,), generator=g)
        xs = 0.15 + (self.labels + torch.rand(n, generator=g)) * 0.7 / 16
        ys = 0.15 + 0.7 * torch.rand(n, generator=g)
        grid = (torch.arange(IMG) + 0.5) / IMG
        half = 0.06
        mx = ((grid[None, :] - xs[:, None]).abs() < half).float()
        my = ((grid[None, :] - ys[:, None]).abs() < half).float()
        img = my[:, :, None] * mx[:, None, :]  # (n, H, W)
        self.images = ((img[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def embedded_dataset(task: str = "dsprites_loc", n: int = 256, split: str = "train") -> Dataset:
    """``n`` images of the project's synthetic VTAB-style ``task`` as normalised tensors."""
    try:
        from torchvision import transforms

        from tasks.data.synthetic import RenderedDataset  # plain torch Dataset, no Lightning

        tf = transforms.Compose([transforms.Resize(IMG), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        return RenderedDataset(task, n, split, transform=tf)
    except ImportError:
        return ToySprites(n, split)


def loaders(task: str = "dsprites_loc", n_train: int | None = None, n_test: int | None = None, batch_size: int = 32):
    n_train = n_train or (128 if SMALL else 512)
    n_test = n_test or (64 if SMALL else 256)
    tr, te = embedded_dataset(task, n_train, "train"), embedded_dataset(task, n_test, "test")
    return (DataLoader(tr, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(te, batch_size=64), getattr(tr, "num_classes", 16))


def upstream_weights(folder: str | os.PathLike) -> Path:
    """A weights file for the notebooks' backbone: the demo's upstream ViT if ``make demo`` ran,
    else a seeded random tiny ViT saved to ``folder`` (so artifacts can pin its fingerprint)."""
    demo = ROOT / "checkpoints" / "upstream" / "vit_demo.safetensors"
    if demo.is_file() and not SMALL:
        return demo
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nb_vit.safetensors"
    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", pretrained=False, **TINY_VIT)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


def backbone_kwargs(weights: Path) -> dict:
    """Build options matching ``weights`` (the demo file records its own in the local zoo)."""
    if weights.name == "vit_demo.safetensors":
        for e in zoo.hub.list_entries(kind="backbone"):
            if e.backbone.get("weights_tag") == "file:vit_demo.safetensors":
                return {"model": e.backbone["model"], **(e.backbone.get("kwargs") or {})}
        # no silent fallback to another architecture (it fails later with ~40 size mismatches)
        raise FileNotFoundError(
            f"{weights} exists but no local zoo entry records its architecture (the `vit-demo` backbone entry, "
            f"written by `python train.py experiment=upstream`); run that once, or delete {weights} and run `make demo`")
    return dict(TINY_VIT)


def train_steps(model: nn.Module, loader, steps: int, lr: float = 1e-3, weight_decay: float = 0.0) -> list[float]:
    """A plain PyTorch loop that honours every adapter hook (what the Lightning task does)."""
    model.train()
    zoo.prepare_adapters(model, loader)
    opt = torch.optim.AdamW(zoo.param_groups(model, lr, weight_decay))
    loss_fn = nn.CrossEntropyLoss()
    losses, it = [], iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        logits = model(x)
        loss = loss_fn(logits, y)
        ctx = zoo.StepContext(model=model, inputs=x, targets=y, outputs=logits, loss=loss, loss_fn=loss_fn,
                              forward=model, batch=(x, y))
        extra = zoo.extra_loss(model, ctx)
        total = loss if extra is None else loss + extra
        opt.zero_grad(set_to_none=True)
        total.backward()
        zoo.before_optimizer_step(model)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return right / max(1, total)


def human(n: float) -> str:
    if n <= 0:
        return "0"
    k = min(int(math.log10(n) // 3), 3)
    return f"{n / 10 ** (3 * k):.3g}{['', 'K', 'M', 'B'][k]}"


# --------------------------------------------------------------------------- the other modalities
# Notebooks 05+ run the project's own task (tasks/, Lightning) from the same Hydra configs as
# train.py: the tiny test config of the modality, or its demo config when the demo's pretrained
# weights are cached (`make demos`) and the notebook is not run small.

def compose(overrides: list[str], out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None):
    """``conf/train.yaml`` composed with ``overrides`` as ``python train.py <overrides>`` would.

    ``data_dir`` replaces ``paths.data_dir`` (the tiny runs generate their data in a scratch folder)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from tasks.runner import register_resolvers

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    return cfg


def choose_config(tiny: str, demo: str, adapter: str, out_dir, tiny_extra: list[str] = (),
                  demo_extra: list[str] = ()) -> tuple[Any, str]:
    """(config, sentence saying which): experiment ``demo`` (+ ``demo_extra`` overrides) if its
    pretrained backbone weights are cached and the notebook is not run small, else experiment
    ``tiny`` (+ ``tiny_extra``; a tiny randomly initialised backbone)."""
    work = Path(out_dir)
    if not SMALL:
        try:
            cfg = compose([f"experiment={demo}", f"adapter={adapter}", *demo_extra], work / "run")
        except Exception:  # noqa: BLE001 - a demo config that does not compose here: use the tiny one
            cfg = None
        w = cfg.backbone.get("weights") if cfg is not None else None
        if w and Path(str(w)).is_file():
            return cfg, (f"the demo's pretrained backbone (`experiment={demo}`, weights `{Path(str(w)).name}`, "
                         f"written by `make demos`) with adapter `{adapter}`")
    # the tiny data in a scratch folder: never mixed with the test suite's tiny sets under data/
    cfg = compose([f"experiment={tiny}", f"adapter={adapter}", *tiny_extra], work / "run", data_dir=work / "data")
    return cfg, (f"a tiny randomly initialised backbone (`experiment={tiny}`, the test suite's config) with "
                 f"adapter `{adapter}`, "
                 f"{'as the test suite runs it' if SMALL else 'as no demo weights are cached (`make demos` writes them)'}"
                 f": its numbers show what is measured, not what the method achieves")


def build(cfg):
    """The task and DataModule that ``cfg`` names, built as ``train.py`` builds them (seeded, data
    set up, data-driven adapter stages prepared). Returns (task, datamodule)."""
    import lightning as L

    from tasks.runner import build_datamodule, build_task, quiet_logs

    quiet_logs()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    task = build_task(cfg)
    dm = build_datamodule(cfg, task)
    dm.prepare_data()
    dm.setup("fit")
    zoo.prepare_adapters(task.model, dm.train_dataloader())  # e.g. CoLoRA's factors, as train.py
    return task, dm


def train(task, dm, steps: int, out_dir: str | os.PathLike | None = None) -> None:
    """``steps`` optimizer steps of the task's own training step and optimizer, with Lightning
    (no validation, no checkpoints, no logs); the task is left in eval mode."""
    import logging
    import warnings

    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no accelerator banner in a notebook
    # the base task's train/loss log on a (x, y, name) batch; harmless here (no logger, no epoch means)
    warnings.filterwarnings("ignore", message=r".*infer the `batch_size` from an ambiguous collection.*")
    # the epochs these steps span: the task's schedule converts warm-up epochs to steps with them
    epochs = math.ceil(steps / max(1, len(dm.train_dataloader())))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=epochs, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out_dir or tempfile.mkdtemp(prefix="zoo-nb-")))
    task.train()  # a notebook may have evaluated it first
    trainer.fit(task, datamodule=dm)
    task.eval()


def fit(cfg, steps: int):
    """:func:`build` then :func:`train` for ``steps`` steps. Returns (task, datamodule)."""
    task, dm = build(cfg)
    train(task, dm, steps, cfg.paths.output_dir)
    return task, dm
