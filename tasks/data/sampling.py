"""DataLoaders whose batches do not depend on how many processes train (one, DDP, several nodes).

A run with ``P`` processes and per-process batch ``b`` should take the same optimisation steps as one
process with batch ``P·b``: DDP averages the ranks' gradients, so each step's gradient is the mean over
the union of the ranks' batches, and that union must be the one process's batch. Two things break it
when the loader is left to Lightning:

* **order**: one process iterates a shuffled DataLoader's ``RandomSampler``, whose permutation comes
  from the loader's generator *after* the DataLoader has drawn its worker base seed from it; under DDP
  Lightning swaps in ``DistributedSampler(seed)``, whose epoch-``e`` permutation is
  ``randperm(n, seed + e)``. The two runs see different batches (and a one-process run that restarts
  the generator each epoch sees the same order every epoch).
* **evaluation padding**: Lightning's ``DistributedSampler`` for validation / test pads the split with
  repeated samples to a multiple of ``P``; sums of per-sample errors then count those twice.

:func:`make_loader` builds the sampler itself, from the trainer's world size and rank:

* training: ``DistributedSampler(num_replicas=P, rank=r, shuffle, seed)`` also when ``P = 1``, so every
  run walks the same global permutation ``π_e = randperm(n, seed + e)`` and rank ``r`` takes
  ``π_e[r::P]``. Its ``j``-th batch is ``π_e[j·P·b + r + P·i]`` for ``i < b``: the ranks' ``j``-th batches
  together are exactly ``π_e[j·P·b : (j+1)·P·b]``, the one-process ``j``-th batch. Lightning calls
  ``set_epoch`` each epoch and does not replace a ``DistributedSampler``. Equality holds when the
  epoch's sample count is a multiple of the global batch (else the last, partial global batch is split
  unevenly: ``drop_last=True`` drops it in every run; ``DistributedSampler`` pads its own tail).
* evaluation: in order, each sample once: rank ``r`` takes samples ``r, r+P, …``
  (Lightning's ``UnrepeatedDistributedSampler``); the task reduces per-sample sums and counts over ranks.
  Every rank needs at least one sample (a rank without batches skips the epoch-end reduction).

Dropout and other in-model randomness are not covered: every rank draws from its own generator.
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


def world_of(trainer: Any) -> tuple[int, int]:
    """``(world_size, global_rank)`` of a Lightning trainer; ``(1, 0)`` without one (before ``fit``)."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, trainer: Any = None,
                shuffle: bool = True, drop_last: bool = False, split: str = "eval", **kwargs: Any) -> DataLoader:
    """A DataLoader over ``dataset`` for this process (see the module docstring); ``kwargs`` go to
    ``DataLoader`` (``num_workers``, ``collate_fn``, ...)."""
    world, rank = world_of(trainer)
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        # drop_last also on the batches: an epoch that is not a multiple of the global batch ends on
        # the same (full) global batch in every run
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
    if len(dataset) < world:
        raise ValueError(f"the {split} split has {len(dataset)} samples for {world} processes: each process needs at "
                         f"least one (use fewer processes or a larger {split} split)")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
