"""tasks.data.sampling: P processes with per-process batch b see exactly the batches of one process with batch P·b."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from tasks.data.sampling import make_loader


def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def _global_batches(n: int, world: int, b: int, epoch: int, seed: int, drop_last: bool = False):
    """The ranks' j-th batches, joined: what DDP averages its gradient over at step j."""
    per_rank = []
    for r in range(world):
        dl = make_loader(list(range(n)), b, train=True, seed=seed, drop_last=drop_last,
                         trainer=SimpleNamespace(world_size=world, global_rank=r))
        dl.sampler.set_epoch(epoch)  # Lightning calls it at every epoch start
        per_rank.append(_batches(dl))
    assert len({len(p) for p in per_rank}) == 1  # same number of steps on every rank (no DDP hang)
    return [sorted(sum((p[j] for p in per_rank), [])) for j in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_take_the_one_process_batches(world):
    n, b, seed = 48, 3, 7  # 48 = a multiple of the global batch
    for epoch in (0, 1):
        one = [sorted(x) for x in _batches(_one(n, world * b, seed, epoch))]
        assert _global_batches(n, world, b, epoch, seed) == one
    # the one-process permutation is DistributedSampler's: randperm(n, seed + epoch), not the DataLoader's
    # generator (which DataLoader advances for its worker seed before the sampler draws)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    assert sum(_batches(_one(n, world * b, seed, 1)), []) == perm
    assert _batches(_one(n, world * b, seed, 0)) != _batches(_one(n, world * b, seed, 1))  # reshuffled per epoch


def _one(n, b, seed, epoch, drop_last=False) -> DataLoader:
    dl = make_loader(list(range(n)), b, train=True, seed=seed, drop_last=drop_last)
    dl.sampler.set_epoch(epoch)
    return dl


def test_drop_last_drops_the_same_partial_global_batch():
    n, world, b = 53, 2, 4  # 53 = 6 global batches of 8 + 5
    one = [sorted(x) for x in _batches(_one(n, world * b, 0, 0, drop_last=True))]
    assert len(one) == 6 and all(len(x) == 8 for x in one)
    assert _global_batches(n, world, b, 0, 0, drop_last=True) == one


def test_eval_shards_cover_each_sample_once_in_order():
    n = 7
    seen = []
    for r in range(3):
        dl = make_loader(list(range(n)), 2, train=False, trainer=SimpleNamespace(world_size=3, global_rank=r))
        seen += sum(_batches(dl), [])
    assert sorted(seen) == list(range(n))  # no padding duplicates (Lightning's default sampler pads to 9)
    assert sum(_batches(make_loader(list(range(n)), 2, train=False)), []) == list(range(n))
    with pytest.raises(ValueError, match="val split has 2 samples for 3 processes"):
        make_loader([0, 1], 2, train=False, split="val", trainer=SimpleNamespace(world_size=3, global_rank=0))


def test_pde_datamodule_refuses_non_boolean_flags_and_unknown_keys():
    # a string such as "maybe" would be truthy; an unknown key used to be swallowed by **kwargs
    from tasks.pde import PDEDataModule

    with pytest.raises(ValueError, match=r"data.drop_last='maybe'; valid: true, false"):
        PDEDataModule(generate="advection", drop_last="maybe")
    with pytest.raises(ValueError, match=r"data.shuffle='no'"):
        PDEDataModule(generate="advection", shuffle="no")
    with pytest.raises(TypeError, match="shufle"):
        PDEDataModule(generate="advection", shufle=False)
