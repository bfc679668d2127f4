"""The training loop against a plain PyTorch one (the oracle): timm's ViT, an ``nn.Linear`` head, the same file list,
transform and shuffled order, AdamW with timm's no-decay groups (the head at ``lr``, the backbone at ``encoder_lr``)
and a linear warm-up then cosine decay per step. Every step's training loss must agree. This is how make demo's
full-fine-tuning collapse was ruled out as a bug of ours (docs/modalities/classification.md#make-demo): a wrong
weight-decay group, warm-up start, head init, train/eval mode, data order or lr group changes some step's loss."""
import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.helpers import run_train


def _plain_loop_losses(data: Path, seed: int, steps_per_epoch: int, epochs: int, lr: float, encoder_lr: float,
                       weight_decay: float, batch: int) -> list[float]:
    import lightning as L
    import timm
    from PIL import Image
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    from torchvision import transforms as T

    L.seed_everything(seed, workers=True)  # what the runner does first; the model is built next, as there
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2, embed_dim=64, num_heads=2)
    head = torch.nn.Linear(64, 16)
    tf = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.5,) * 3, (0.5,) * 3)])
    rows = [ln.rsplit(maxsplit=1) for ln in (data / "train800.txt").read_text().splitlines() if ln.strip()]
    xs = torch.stack([tf(Image.open(data / rel).convert("RGB")) for rel, _ in rows])
    ys = torch.tensor([int(y) for _, y in rows])
    groups = []
    for module, group_lr in ((net, encoder_lr), (head, lr)):
        named = list(module.named_parameters())
        decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
        groups += [{"params": decay, "lr": group_lr, "weight_decay": weight_decay},
                   {"params": [p for n, p in named if not any(p is q for q in decay)], "lr": group_lr,
                    "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    total = steps_per_epoch * epochs
    warm = steps_per_epoch  # warmup_epochs=1
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=1e-3, total_iters=warm),
                               CosineAnnealingLR(opt, T_max=total - warm, eta_min=1e-8)], milestones=[warm])
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(head(net(xs[idx])), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def test_full_fine_tuning_steps_equal_a_plain_pytorch_loop(tmp_path):
    steps, epochs, lr, enc_lr, wd = 8, 2, 5e-3, 1e-3, 0.5  # a large decay: a wrong no-decay group shows
    m = run_train(["experiment=tiny", "adapter=full", "seed=3", f"task.optimizer.lr={lr}",
                   f"task.optimizer.encoder_lr={enc_lr}", f"task.optimizer.weight_decay={wd}",
                   "task.scheduler.warmup_epochs=1", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    logged = [float(r["train/loss_step"]) for r in csv.DictReader(open(Path(m["out_dir"]) / "csv" / "metrics.csv"))
              if r.get("train/loss_step")]
    assert len(logged) == steps * epochs
    oracle = _plain_loop_losses(tmp_path / "data" / "synthetic" / "dsprites_loc", 3, steps, epochs, lr, enc_lr, wd, 64)
    assert all(math.isfinite(v) for v in oracle)
    for step, (a, b) in enumerate(zip(logged, oracle)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: Lightning {a} vs plain loop {b}"
    assert abs(logged[-1] - logged[0]) > 1e-3  # it trained (the comparison is not of a constant)
