"""PDE forecasting (``task=pde``): teacher-forced one-step training, autoregressive rollout evaluation.

Training (MORPH, arXiv 2509.21670): MSE between the model's next-frame prediction and the true next frame,
both RevIN-normalised, over windows of ``context`` frames sliding along every training trajectory.
Evaluation: from the first ``context`` frames of each validation / test trajectory the model rolls out
``rollout_horizon`` steps, feeding its predictions back (:func:`tasks.metrics.pde.rollout`); predictions and
targets are de-normalised, cropped to the original spatial region and scored per field and per step
(MSE, RMSE, nRMSE, VRMSE and PDEBench's cRMSE, bRMSE, fRMSE low/mid/high; :mod:`tasks.metrics.pde`).
``val/nrmse`` (mean over steps and fields) is the monitored value (lower is better). ``test`` writes ``rollout_metrics.json``, ``rollout_nrmse.md`` and
``rollout_error.png`` (error vs rollout step) to the run directory.

The model is the backbone in a layer-less ``backbone_output`` head (MORPH's decoder is its prediction head);
the task is a :class:`tasks.base.ZooTask` (kind ``pde``, monitor ``val/nrmse``, mode ``min``): the shared
training step calls the adapter hooks; validation and test are overridden with the rollout.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

import zoo
from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from tasks.data.pde import (DATASET_NORMS, REVIN, Trajectories, WindowDataset, dataset_norm_stats, read_norm_stats,
                            revin_denorm, split_indices)
from tasks.options import SCHEDULER, Int, check_options
from tasks.data.sampling import make_loader
from tasks.metrics.pde import MAXED, METRICS, RolloutMetrics, format_table, plot_error_vs_step, rollout
from zoo.heads import BackboneOutput


EVAL_WINDOWS = ("first", "all")


@register_task("pde")
class PDEForecastTask(ZooTask):
    """Task kind ``pde``: next-frame forecasting with rollout evaluation (see the module docstring)."""

    monitor_default = "val/nrmse"
    mode_default = "min"
    columns = (Column("val/nrmse", "val nRMSE"), Column("val/vrmse", "val VRMSE"),
               Column("test/nrmse", "test nRMSE"), Column("test/vrmse", "test VRMSE"),
               Column("test/nrmse_last_step", "test nRMSE (last step)"), Column("test/max_err", "test max error"),
               # PDEBench's conserved-quantity, boundary and Fourier-band errors (tasks/metrics/pde.py)
               Column("test/crmse", "test cRMSE"), Column("test/brmse", "test bRMSE"),
               Column("test/frmse_low", "test fRMSE low"), Column("test/frmse_mid", "test fRMSE mid"),
               Column("test/frmse_high", "test fRMSE high"))
    predict_output = "fields"
    tiny_overrides = ("experiment=tiny_pde",)

    def __init__(self, backbone: dict, adapter: dict, context: int = 1, rollout_horizon: int = 10,
                 optimizer: dict | None = None, scheduler: dict | None = None, monitor: str | None = None,
                 monitor_mode: str | None = None, output_dir: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, {"weight_decay": 0.0, **(optimizer or {})}, None, monitor, monitor_mode, **meta)
        self.save_hyperparameters()
        sched_cfg = {"name": "plateau", "factor": 0.5, "patience": 5, "warmup_epochs": 0, "min_lr": 0.0, **(scheduler or {})}
        sched_cfg.update(check_options("task.scheduler", sched_cfg, SCHEDULER))  # before the model is built
        horizon = parse_horizon(rollout_horizon)
        bb = create_backbone(backbone)
        if not hasattr(bb, "forward_all"):
            raise ValueError(f"task=pde needs a PDE backbone that predicts the next frame (backbone=morph), "
                             f"not {backbone.get('name')!r}")
        self.model = attach_adapter(BackboneOutput(bb), adapter)
        self.context, self.horizon = int(context), horizon
        if self.context > bb.cfg.max_ar:
            raise ValueError(f"task.context={self.context} exceeds the backbone's max_ar={bb.cfg.max_ar}")
        self.sched_cfg = sched_cfg
        self.output_dir = output_dir
        self._metrics: dict[str, RolloutMetrics] = {}
        self.last_tables: dict[str, dict] = {}
        self.channel_values: dict[str, dict] = {}

    @classmethod
    def eval_overrides(cls, task_cfg: dict, data_cfg: dict, split: str) -> None:
        """The dataset name follows the data evaluated (the config's rule: the equation generated, or
        ``pdebench`` for a file, which wins over ``generate``), not the one recorded at training."""
        if data_cfg.get("path"):
            task_cfg["dataset"] = "pdebench"
        elif data_cfg.get("generate"):
            gen = data_cfg["generate"]
            task_cfg["dataset"] = gen if isinstance(gen, str) else "+".join(map(str, gen))

    def preprocessing(self) -> dict[str, Any]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        rec = {"layout": "UPTF-7 (B, t, F, C, D, H, W)", "context": self.context}
        if dm is not None:
            rec.update({"revin": dm.revin, "fit": dm.fit, "spatial": list(dm.spatial or []), "fields": dm.field_names})
            if getattr(dm, "norm_record", None):  # The Well's statistics as used (revin=zscore|rms)
                rec["norm_stats"] = dm.norm_record
        return rec

    def protocol_details(self, datamodule) -> dict[str, Any]:
        """PDEBench's ``initial_step`` (the context frames), the rollout horizon (``full``: to each trajectory's
        end), the RevIN statistics and the metrics' axes."""
        h = self.horizon if self.horizon is not None else \
            {"full": sorted(getattr(datamodule, "horizons", ())) or None}
        revin = getattr(datamodule, "revin", None)
        norm = {"revin": revin,
                "stats": {"trajectory": "mean/std of each whole trajectory (MORPH)",
                          "context": "mean/std of the context frames only", "none": None,
                          "zscore": "The Well's ZScoreNormalization: (x - mean) / max(std, 1e-4) per channel, from the "
                                    "dataset's stats.yaml (its training split's statistics)",
                          "rms": "The Well's RMSNormalization: x / max(rms, 1e-4) per channel, from the dataset's "
                                 "stats.yaml"}.get(revin)}
        if revin in DATASET_NORMS and getattr(datamodule, "norm_record", None):
            norm.update(datamodule.norm_record)  # the file and the per-channel values used
        windows = getattr(datamodule, "eval_windows", "first")
        chans = getattr(datamodule, "channels", None)
        every = windows == "all" and self.horizon is not None  # a rollout to the end has one window: t = 0
        return {"initial_step": self.context, "horizon": h, "start": "every window" if every else 0,
                "normalisation": norm,
                "channels": [n for _, _, n in chans] if chans else None,
                "metric": {"nrmse": "per channel (each scalar field, each vector component) over space, mean over "
                                    "samples, steps and channels (PDEBench metric_func)",
                           "vrmse": "per channel over space, the error over the unbiased variance of the target "
                                    "(The Well's VRMSE), mean over samples, steps and channels; per channel: "
                                    "test/vrmse_per_channel",
                           "max_err": "max over samples and space per "
                                      "channel and step, mean over channels and steps (PDEBench err_Max)",
                           "metrics_space": "de-normalised, original spatial region"}}

    def run_metrics(self, trainer, datamodule) -> dict[str, Any]:
        """``test/vrmse_per_channel`` and ``test/nrmse_per_channel``: ``{channel: value}``, the mean over steps
        (The Well's per-field rows: ``velocity_x``, ``velocity_y``, ...)."""
        return {f"test/{k}": v for k, v in self.channel_values.get("test", {}).items()}

    # ------------------------------------------------------------------ steps
    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher-forced one-step MSE on RevIN-normalised frames (MORPH)."""
        if target.ndim == pred.ndim + 1:  # a (B, k, ...) window: its first frame is the one-step target
            target = target[:, 0]
        return F.mse_loss(pred, target)

    def update_metrics(self, stage: str, outputs, targets) -> None:
        """Training logs only the loss; validation and test are rollouts (:meth:`_eval_step`)."""

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spatial = getattr(dm, "spatial", None)
        if spatial is None:
            return x
        d, h, w = spatial
        return x[..., :d, :h, :w]

    def _eval_step(self, stage: str, batch) -> None:
        ctx, tgt, mu, sigma = batch[0], batch[1], batch[2], batch[3]
        if tgt.ndim < ctx.ndim:  # horizon 1: a single next frame
            tgt = tgt[:, None]
        pred = rollout(self.model, ctx, tgt.shape[1])
        pred, tgt = revin_denorm(pred, mu, sigma), revin_denorm(tgt, mu, sigma)
        self._metrics.setdefault(stage, RolloutMetrics()).update(self._crop(pred), self._crop(tgt))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _epoch_end(self, stage: str) -> dict:
        m = self._metrics.pop(stage, None)
        if m is None or not m.count:
            return {}
        sums = {k: v.to(self.device) for k, v in m.sums.items()}
        count = torch.tensor(float(m.count), device=self.device)
        if self.trainer.world_size > 1:  # sum per-sample errors and counts over ranks
            for k in sums:
                sums[k] = self.trainer.strategy.reduce(sums[k], reduce_op="max" if k in MAXED else "sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        total = RolloutMetrics()
        total.merge_counts({k: v.cpu() for k, v in sums.items()}, int(count.item()), m.spatial)
        tables = total.tables()
        chans = getattr(getattr(self.trainer, "datamodule", None), "channels", None)
        pairs = [(f, c) for f, c, _ in chans] if chans else None
        for k, v in total.summary(pairs).items():  # nRMSE, VRMSE: the mean over channels (PDEBench, The Well)
            self.log(f"{stage}/{k}", v, sync_dist=False, rank_zero_only=False)
        per_channel = total.channel_tables(pairs) if pairs else None
        last = per_channel["nrmse"][-1] if per_channel else tables["nrmse"][-1]
        self.log(f"{stage}/nrmse_last_step", float(last.mean()))
        self.last_tables[stage] = {k: v.tolist() for k, v in tables.items()}
        if per_channel:  # each channel's value, mean over steps (The Well's per-field rows)
            self.channel_values[stage] = {f"{m}_per_channel": {n: float(v[:, j].mean()) for j, (_, _, n) in enumerate(chans)}
                                          for m, v in per_channel.items()}
        return tables

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        tables = self._epoch_end("test")
        if tables and self.output_dir and self.trainer.is_global_zero:
            write_rollout_report(Path(self.output_dir), tables, getattr(self.trainer.datamodule, "field_names", None))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        c = self.optim_cfg
        groups = zoo.param_groups(self.model, c["lr"], c["weight_decay"])
        if not groups:
            names = [a.name for a in zoo.adapters_of(self.model)]
            raise ValueError(f"adapter {names} leaves nothing to train on this backbone (MORPH's prediction head is its "
                             "decoder, part of the backbone): use e.g. adapter=morph_level3, or adapter=lora "
                             "'adapter.targets=[q,v,decoder]'")
        opt = zoo.build_optimizer(self.model, groups, c["lr"], c["weight_decay"], tuple(c["betas"]))
        name = self.sched_cfg["name"]
        if name == "cosine":  # the zoo's shared warm-up + cosine schedule
            return super().configure_optimizers()
        if name in (None, "none"):
            return opt
        if name != "plateau":
            raise ValueError(f"task.scheduler.name={name!r}; valid: plateau (MORPH's ReduceLROnPlateau), cosine, none")
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=self.monitor_mode, factor=self.sched_cfg["factor"],
                                                           patience=self.sched_cfg["patience"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch",
                                                   "strict": False}}


def parse_horizon(value) -> int | None:
    """``task.rollout_horizon``: a number of steps, or ``full`` (null) for the rest of each trajectory."""
    if value in (None, "full"):
        return None
    try:
        steps = None if isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        steps = None
    if steps is None or steps != value or steps < 1:
        raise ValueError(f"task.rollout_horizon={value!r}: a number of steps >= 1, or full (to the trajectory's end)")
    return steps


def write_rollout_report(out: Path, tables: dict[str, torch.Tensor], fields: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v.tolist() for k, v in tables.items()}
    tmp = out / "rollout_metrics.json.tmp"
    tmp.write_text(json.dumps({"fields": fields, "metrics": data, "layout": "metric[step][field]"}, indent=1))
    os.replace(tmp, out / "rollout_metrics.json")
    md = "\n\n".join(f"### {m} per rollout step\n\n{format_table(tables, m, fields)}" for m in METRICS)
    tmp = out / "rollout_metrics.md.tmp"
    tmp.write_text(md + "\n")
    os.replace(tmp, out / "rollout_metrics.md")
    plot_error_vs_step(tables, out / "rollout_error.png")


# ---------------------------------------------------------------------------------- data
def _leaves(parts):
    for p in parts:
        if isinstance(p, ConcatDataset):
            yield from _leaves(p.datasets)
        else:
            yield p


class PDEDataModule(L.LightningDataModule):
    """A PDEBench file (``path``), a The Well dataset folder (``path`` with ``data/{train,valid,test}``), or an
    embedded equation written on first use (``generate=<equation>`` under ``root``)."""

    def __init__(self, path: str | Sequence[str] | None = None, root: str = "data/pde",
                 generate: str | Sequence[str] | None = None,
                 generate_options: dict | None = None, fields: Sequence[str] | None = None, context: int = 1,
                 rollout_horizon: int = 10, revin: str = "trajectory", on_nan: str = "error", fit: str = "pad",
                 stride: int = 1, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 0,
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0, stats_file: str | None = None,
                 eval_windows: str = "first"):
        super().__init__()
        # rollout_horizon is a number or ``full``: parse_horizon checks it (one line naming both forms)
        check_options("data", locals(), {"context": Int(1), "stride": Int(1),
                                         "batch_size": Int(1), "eval_batch_size": Int(1, optional=True),
                                         "num_workers": Int(0)})
        if fit not in ("pad", "crop"):  # used only when an axis is not a multiple of 8: checked here, for every file
            raise ValueError(f"data.fit={fit!r}; valid: pad, crop")
        if path is None and generate is None:
            raise ValueError("task=pde needs data.path=<PDEBench .hdf5 / The Well dataset folder> or data.generate=<equation>")
        self.path, self.root, self.generate = path, root, generate
        self.generate_options = dict(generate_options or {})
        self.fields = list(fields) if fields else None
        self.context, self.horizon = int(context), parse_horizon(rollout_horizon)
        self.revin, self.on_nan, self.fit, self.stride = revin, on_nan, fit, int(stride)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"data.{name}={flag!r}; valid: true, false")
        self.drop_last = drop_last
        if revin not in REVIN + DATASET_NORMS:
            raise ValueError(f"data.revin={revin!r}; valid: {', '.join(REVIN + DATASET_NORMS)}")
        if eval_windows not in EVAL_WINDOWS:
            raise ValueError(f"data.eval_windows={eval_windows!r}; valid: {', '.join(EVAL_WINDOWS)}")
        self.stats_file, self.eval_windows = stats_file, eval_windows
        self.norm_record: dict[str, Any] | None = None  # The Well's statistics as used (zscore / rms)
        self.channels: list[tuple[int, int, str]] | None = None
        self.spatial = None
        self.field_names: list[str] | None = None
        self.horizons: set[int] = set()  # the rollout lengths 'full' resolved to
        self.test_set = "test"  # PDEBench files and The Well folders always hold a test split: the runner tests it
        self._sets: dict[str, Any] = {}

    def resolve_paths(self) -> list[Path]:
        """The data file(s) or The Well folder; several files (or equations) must share one sample shape."""
        if self.path is not None:
            return [Path(p) for p in ([self.path] if isinstance(self.path, (str, os.PathLike)) else self.path)]
        from tasks.data.pde_solvers import generate

        out = []
        for eq in [self.generate] if isinstance(self.generate, str) else list(self.generate):
            opts = dict(self.generate_options)
            tag = hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:8]
            folder = Path(self.root) / f"{eq}-{tag}"  # one folder per equation + options
            existing = sorted(folder.glob("*.h*5"))
            out.append(existing[0] if existing else generate(eq, folder, **opts))
        return out

    def prepare_data(self) -> None:
        self.resolve_paths()

    def check_recorded(self, rec: dict[str, Any]) -> None:
        """Refuse data of another dimensionality or other fields than an artifact recorded
        (``preprocessing``: ``spatial``, ``fields``); ``eval.py`` calls it before evaluating."""
        want_sp, want_f = rec.get("spatial"), rec.get("fields")
        if not want_sp and not want_f:
            return
        self.prepare_data()
        self._datasets("val", self.horizon, [0])  # reads the layout: spatial shape and field names
        dims = lambda sp: sum(int(s) > 1 for s in sp)  # (D, H, W) with 1 for absent axes
        diffs = []
        if want_sp and self.spatial is not None and dims(want_sp) != dims(self.spatial):
            diffs.append(f"{dims(want_sp)}-D data (spatial {list(want_sp)}), this data is {dims(self.spatial)}-D "
                         f"({list(self.spatial)})")
        if want_f and self.field_names is not None and list(want_f) != list(self.field_names):
            diffs.append(f"fields {list(want_f)}, this data has {list(self.field_names)}")
        if diffs:
            raise ValueError(f"the artifact was trained on {'; '.join(diffs)}: it cannot be evaluated on "
                             f"{', '.join(map(str, self.resolve_paths()))}")

    def _well_files(self, base: Path, split: str) -> list[Path]:
        folder = base / "data" / {"train": "train", "val": "valid", "test": "test"}[split]
        files = sorted(list(folder.glob("*.hdf5")) + list(folder.glob("*.h5")))
        if not files:
            raise FileNotFoundError(f"The Well dataset {base}: no .hdf5 files in {folder}")
        return files

    def _datasets(self, split: str, horizon: int, starts):
        parts = [self._dataset(p, split, horizon, starts) for p in self.resolve_paths()]
        shapes = {tuple(p.traj.read(0, 0, 1).shape[1:]) for p in _leaves(parts)}
        if len(shapes) > 1:
            raise ValueError(f"data files with different sample shapes (F, C, D, H, W) cannot share batches: {sorted(shapes)}")
        return ConcatDataset(parts) if len(parts) > 1 else parts[0]

    def _norm_stats(self, tr: Trajectories, base: Path) -> tuple | None:
        """The Well's per-channel statistics for ``revin=zscore|rms`` (``data.stats_file``, else the dataset
        folder's ``stats.yaml``); ``None`` for the RevIN modes. Recorded in :attr:`norm_record`."""
        if self.revin not in DATASET_NORMS:
            return None
        file = Path(self.stats_file).expanduser() if self.stats_file else (base if base.is_dir() else base.parent) / "stats.yaml"
        shift, scale = dataset_norm_stats(read_norm_stats(file), tr.layout, self.revin, str(file))
        chans = tr.channels()
        self.norm_record = {"file": str(file), **{k: {n: float(v[f, c]) for f, c, n in chans}
                                                  for k, v in (("shift", shift), ("scale", scale))}}
        return shift, scale

    def _dataset(self, path: Path, split: str, horizon: int | None, starts):
        stride = self.stride if split == "train" else 1  # evaluation windows: every start (The Well's test set)
        if path.is_dir():
            parts = []
            for f in self._well_files(path, split):
                tr = Trajectories(f, self.fields, self.fit)
                parts.append(WindowDataset(tr, list(range(len(tr))), self.context, self._steps(tr, horizon), self.revin,
                                           self.on_nan, starts, stride=stride, norm_stats=self._norm_stats(tr, path)))
            self._note(parts[0].traj)
            return ConcatDataset(parts) if len(parts) > 1 else parts[0]
        if not path.is_file():
            raise FileNotFoundError(f"PDE data file not found: {path}")
        key = str(path)
        if key not in self._sets:
            tr = Trajectories(path, self.fields, self.fit)
            self._sets[key] = (tr, tr.scan())
        tr, stats = self._sets[key]
        self._note(tr)
        return WindowDataset(tr, split_indices(tr, split), self.context, self._steps(tr, horizon), self.revin, self.on_nan,
                             starts, stats=stats, stride=stride, norm_stats=self._norm_stats(tr, path))

    def _steps(self, tr: Trajectories, horizon: int | None) -> int:
        """The rollout length: ``horizon`` steps, or (``full``) to the trajectory's last frame, as PDEBench."""
        if horizon is not None:
            return horizon
        self.horizons.add(tr.frames - self.context)
        return tr.frames - self.context

    def _note(self, tr: Trajectories) -> None:
        self.spatial = tr.spatial
        self.channels = tr.channels()
        lay = tr.layout
        if lay.kind == "fields":
            self.field_names = ["V" if c else g[0] for g, c in zip(lay.keys, lay.components)]
        elif lay.kind == "well":
            self.field_names = [name for _, name in lay.keys]
        else:
            self.field_names = [f"u{j}" for j in range(len(lay.components))] if lay.kind == "seeds" else ["u"]

    @property
    def eval_starts(self) -> list[int] | None:
        """Where evaluation windows start: ``first``: t = 0 only (PDEBench, MORPH); ``all``: every start, stride
        1 (The Well's ``test`` / ``valid`` datasets, ``n_steps_input`` → ``n_steps_output`` windows)."""
        return [0] if self.eval_windows == "first" else None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._sets["train"] = self._datasets("train", 1, None)
            self._sets["val"] = self._datasets("val", self.horizon, self.eval_starts)
        if stage in (None, "test") and "test" not in self._sets:  # split_info may have built it already
            self._sets["test"] = self._datasets("test", self.horizon, self.eval_starts)
        if stage == "validate":
            self._sets["val"] = self._datasets("val", self.horizon, self.eval_starts)

    def split_info(self) -> dict:
        """PDEBench files: the module's seeded 80/10/10 split of trajectories; The Well: its train / valid / test
        folders. Sizes count windows (train; val and test with ``eval_windows=all``) or trajectories (val,
        test: one rollout from t = 0 each)."""
        well = any(p.is_dir() for p in self.resolve_paths())
        names = {"train": "train", "val": "valid" if well else "val", "test": "test"}
        if "test" not in self._sets and "train" in self._sets:  # the record gives the test split's size too
            try:
                self._sets["test"] = self._datasets("test", self.horizon, self.eval_starts)
            except FileNotFoundError:  # a The Well folder without test/: the run says so when it tests
                pass
        return {s: {"name": names[s], "size": len(self._sets[s]) if s in self._sets else None} for s in names} \
            | {"val_overlaps_test": False}

    def _loader(self, split: str, train: bool, batch_size: int) -> DataLoader:
        # the sampler is built here from the trainer's world size: one process and P processes with the
        # same global batch take the same steps (tasks/data/sampling.py)
        return make_loader(self._sets[split], batch_size, train=train, seed=self.seed, trainer=self.trainer,
                           shuffle=self.shuffle, drop_last=self.drop_last, split=split, num_workers=self.num_workers,
                           persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
