"""EVA: Explained Variance Adaptation — LoRA with ``A`` initialised from the principal components of each
layer's input activations and the rank budget redistributed by explained variance (Paischer et al.,
"One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", 2024; reference
``ml-jku/EVA``; peft ``LoraConfig(init_lora_weights="eva")``, ``src/peft/tuners/lora/eva.py``).

For each target layer ``l`` (input ``X_l ∈ R^{N×d_in}``, every token of every sample):

1. PCA of ``X_l``: components ``V_l`` (rows, by decreasing variance) and explained-variance ratios
   ``ρ_{l,i} = λ_{l,i} / Σ_j λ_{l,j}``, estimated batch by batch until the components a layer needs are
   stable (cosine similarity of successive estimates ≥ ``tau``).
2. Rank redistribution: each layer offers its top ``round(rho · r)`` ratios; all are sorted globally and
   the top ``Σ_l r`` kept, which sets ``r_l`` (possibly 0: the layer gets no adapter).
3. ``A_l = V_l[:r_l]`` (``whiten``: row ``i`` divided by ``√σ_i``, ``σ_i`` the singular value of the centred
   data), ``B_l = 0``: the model is unchanged at init. ``W0`` is untouched.
4. ``adjust_scaling_factors``: ``α_l = α · r_l / r`` (so ``s_l = α_l / r_l = α / r``, LoRA's scale).

Step 1 is a reconstruction of peft's: peft runs incremental PCA with a randomised ``svd_lowrank`` (seed
42) per batch; here the exact running mean and scatter matrix are accumulated (float64) and
eigendecomposed after each batch, so the estimate is the exact PCA of the data seen so far (the limit
peft's estimate converges to) and is deterministic. Convergence uses ``|cos|`` (eigenvectors have no
sign); ``max_batches`` bounds the pass; batches with fewer rows than components are pooled until
there are enough (peft skips them). Layers with identical inputs (q and v slices of one fused qkv)
share one decomposition, as peft's input hashing does. Steps 2–4 are peft's (``_get_rank_distribution``,
``_load_eva_state_dict``); :meth:`EVA.load_eva_state_dict` takes peft's ``eva_state_dict`` format.

The training-loop hook: ``prepare(model, dataloader, loss_fn)`` — a forward-only pass (the task's
``loss_fn`` drives the forwards, under ``no_grad``). The ranks it finds are recorded in the adapter's
config (``ranks``), so loading an artifact rebuilds the same shapes without data; a resumed run re-runs
the (deterministic) pass. Trainable parameters: ``Σ_l r_l (d_in + d_out)`` (= LoRA's total when every
layer has the same shape). Defaults (peft ``EvaConfig``): rho 2, tau 0.99, whiten off (peft notes whitening
helps in vision), adjust_scaling_factors on; r = 8, α = 8 on q and v. ``train_biases`` also trains the
backbone's biases, as the paper's VTAB-1k code does (``BenediktAlkin/vtab1k-pytorch`` ``EvaLoraTrainer``).
"""
from __future__ import annotations

from collections import Counter
from itertools import cycle

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, dropout_option, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import LoRALinear
from zoo.sites import unwrap


class RunningPCA:
    """Exact PCA of all rows seen so far: running mean and scatter (float64), eigendecomposed on demand."""

    def __init__(self, d: int, n_components: int):
        self.n, self.k = 0, n_components
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.scatter = torch.zeros(d, d, dtype=torch.float64)
        self.components = None  # (k, d)
        self.ratios = None  # (k,)
        self.singular_values = None  # (k,)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        m, mean_b = x.shape[0], x.mean(0)
        xc = x - mean_b
        delta = mean_b - self.mean
        tot = self.n + m
        self.scatter += xc.t() @ xc + torch.outer(delta, delta) * (self.n * m / tot)  # Chan et al. merge
        self.mean += delta * (m / tot)
        self.n = tot
        evals, evecs = torch.linalg.eigh(self.scatter)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        total = evals.sum()
        self.components = evecs[:, :self.k].t().contiguous()
        self.ratios = evals[:self.k] / total if total > 0 else torch.zeros(self.k, dtype=torch.float64)
        self.singular_values = evals[:self.k].sqrt()  # of the centred data matrix (sklearn's singular_values_)


class EVALinear(LoRALinear):
    """A LoRA delta on one output slice (``None`` = every row) with its own rank and ``α``."""


@register_adapter("eva")
class EVA(Adapter):
    """EVA: LoRA initialised from activation PCA, with ranks redistributed by explained variance."""

    mergeable = True
    supports_slices = True
    paper = "Paischer et al., EVA (Explained Variance Adaptation), 2024"

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, targets: list[str] = ("q", "v"),
                 layers="all", rho: float = 2.0, tau: float = 0.99, whiten: bool = False,
                 adjust_scaling_factors: bool = True, max_batches: int = 100, train_biases: bool = False,
                 ranks: dict | None = None):
        super().__init__()
        self.rank = int_option("eva", "rank", rank)
        self.alpha = float_option("eva", "alpha", alpha)
        self.dropout = dropout_option("eva", dropout)
        self.rho = float_option("eva", "rho", rho, lo=1.0)
        self.tau = float_option("eva", "tau", tau, 0.0, 1.0)
        self.max_batches = int_option("eva", "max_batches", max_batches)
        for name, v in (("whiten", whiten), ("adjust_scaling_factors", adjust_scaling_factors),
                        ("train_biases", train_biases)):
            if not isinstance(v, bool):
                raise ValueError(f"adapter 'eva': {name} must be true or false, got {v!r}")
        self.whiten, self.adjust, self.train_biases = whiten, adjust_scaling_factors, train_biases
        self.targets, self.layers = list(targets), layers
        self.ranks: dict[str, int] | None = None if ranks is None else {str(k): int(v) for k, v in dict(ranks).items()}

    @property
    def prepared(self) -> bool:
        return self.ranks is not None

    # ------------------------------------------------------------------ sites
    def units(self) -> list[tuple[str, object, str, slice | None]]:
        """``(key, site, slice name, out_slice)`` per adapted weight: a whole Linear, or a q / k / v slice."""
        out = []
        for site, slices in linear_site_groups(self, "EVA"):
            path = site.path.split("[")[0]  # a slice site's path names its slice: blocks.0.attn.qkv[q]
            for kind, sl in slices.items():
                out.append((path if sl is None else f"{path}[{kind}]", site, kind, sl))
        return out

    def attach(self, backbone) -> None:
        for key, site, kind, sl in self.units():
            r = self.rank if self.ranks is None else self.ranks.get(key, self.rank)
            if r == 0:
                continue
            alpha = self.alpha * r / self.rank if self.adjust else self.alpha
            self.replace(site, EVALinear(site.module, r, alpha, self.dropout, {kind: sl}))
            self.modules[-1].eva_key = key

    def mark_trainable(self) -> None:
        super().mark_trainable()
        if self.train_biases:  # the paper's VTAB-1k code (vtab1k-pytorch EvaLoraTrainer, train_biases=True)
            for name, p in self.backbone.tower_named_parameters(self.own_tower()):
                if name.endswith(".bias"):
                    p.requires_grad_(True)

    # ------------------------------------------------------------------ the data pass
    def prepare(self, model: nn.Module, dataloader, loss_fn=None) -> None:
        if self.prepared:
            return
        self.load_eva_state_dict(self.eva_state_dict(model, dataloader, loss_fn))

    @torch.no_grad()
    def eva_state_dict(self, model: nn.Module, dataloader, loss_fn=None) -> dict[str, torch.Tensor]:
        """``{key: A_l (r_l × d_in)}`` as peft's ``get_eva_state_dict`` (keys: the sites' paths)."""
        from zoo.adapters.base import default_batch_loss

        loss_fn = loss_fn or default_batch_loss(model)
        units = self.units()
        keys = [k for k, *_ in units]
        linears = {k: unwrap(s.module) for k, s, *_ in units}
        n_comp = {k: round(self.rho * self.rank) for k in keys}
        pcas: dict[int, RunningPCA] = {}
        for k, lin in linears.items():  # one decomposition per distinct input (q and v of one qkv)
            if id(lin) not in pcas:
                pcas[id(lin)] = RunningPCA(lin.in_features, min(n_comp[k], lin.in_features))
        pca_of = {k: pcas[id(lin)] for k, lin in linears.items()}
        # the first forward hook: store inputs; the PCA update runs after the forward
        seen: dict[int, torch.Tensor] = {}
        hooks = [lin.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(id(mod), inp[0].reshape(-1, inp[0].shape[-1])))
                 for lin in {id(l): l for l in linears.values()}.values()]
        budget = self.rank * len(keys)
        rank_dist = dict(n_comp)
        prev: dict[int, torch.Tensor] = {}
        pending: dict[int, torch.Tensor] = {}
        converged: dict[int, bool] = {i: False for i in pcas}
        was_training = model.training
        model.eval()
        try:
            for _, batch in zip(range(self.max_batches), cycle(dataloader)):
                seen.clear()
                loss_fn(batch)
                for i, p in pcas.items():
                    if converged[i] or i not in seen:
                        continue
                    rows = torch.cat([pending.pop(i), seen[i]]) if i in pending else seen[i]
                    if p.components is None and rows.shape[0] < p.k:
                        pending[i] = rows  # fewer rows than components: wait for the next batch (peft skips it)
                        continue
                    p.update(rows)
                rank_dist = self._rank_distribution(pca_of, n_comp, budget)
                for i, p in pcas.items():
                    need = max((rank_dist[k] for k in keys if pca_of[k] is p), default=0)
                    if p.components is None:
                        continue
                    if i in prev and need > 0:
                        cos = (p.components[:need] * prev[i][:need]).sum(1).abs()
                        converged[i] = bool((cos >= self.tau).all())
                    elif need == 0 and i in prev:
                        converged[i] = True
                    prev[i] = p.components.clone()
                if all(converged.values()):
                    break
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        if any(p.components is None for p in pcas.values()):
            raise ValueError(f"EVA: a target layer saw fewer input rows than its {round(self.rho * self.rank)} components in "
                             f"{self.max_batches} batches; use larger batches, more max_batches or a smaller rho * rank")
        out = {}
        for k in keys:
            p, r = pca_of[k], rank_dist[k]
            u = p.components[:r].clone()
            if self.whiten:
                u /= p.singular_values[:r].sqrt().reshape(-1, 1)
            out[k] = u.float()
        return out

    def _rank_distribution(self, pca_of, n_comp, budget) -> dict[str, int]:
        """peft's ``_get_rank_distribution``: the top ``budget`` explained-variance ratios over all layers."""
        keys, values = [], []
        for k, p in pca_of.items():
            if p.ratios is None:
                return dict(n_comp)
            for v in p.ratios[:n_comp[k]]:
                keys.append(k)
                values.append(v)
        idx = torch.stack(values).argsort(descending=True, stable=True)
        counts = Counter(keys[i] for i in idx[:budget].tolist())
        return {k: counts.get(k, 0) for k in pca_of}

    @torch.no_grad()
    def load_eva_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the adapter with ``r_l = state[key].shape[0]`` and ``A_l = state[key]`` (``B_l = 0``); as
        peft's ``_load_eva_state_dict``: rank 0 drops the layer, ``adjust_scaling_factors`` sets α_l = α r_l / r."""
        keys = [k for k, *_ in self.units()]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"EVA state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        self.unload()
        self.ranks = {k: int(state[k].shape[0]) for k in keys}
        self.config["ranks"] = dict(self.ranks)
        self.attach(self.backbone)
        for m in self.modules:
            m.lora_A.copy_(state[m.eva_key].to(m.lora_A.dtype))
            m.train(self.backbone.training)
        self.mark_trainable()
