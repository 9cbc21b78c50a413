"""Training samplers: repeated augmentation (DeiT's RASampler, timm's RepeatAugSampler), resumable mid-epoch.

Repeated augmentation (Hoffer et al. 2020; DeiT, arXiv 2012.12877) puts `repeats` copies of each image into an
epoch, spread over the processes so that each copy is augmented on another one; an epoch stops after about as many
samples as a plain epoch has (rounded down to 256 images over all processes), so its number of updates is unchanged.
"""
import math

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

__all__ = ['RepeatAugSampler', 'repeated_order']


def repeated_order(order: torch.Tensor, repeats: int, num_replicas: int, rank: int, selected: int) -> list:
    """The indices one process draws: every entry of `order` `repeats` times in a row, the list wrapped around to a
    multiple of `num_replicas`, every `num_replicas`-th entry from `rank` on, the first `selected` of those."""
    repeated = torch.repeat_interleave(order, repeats).tolist()
    total = math.ceil(len(repeated) / num_replicas) * num_replicas
    return [repeated[i % len(repeated)] for i in range(rank, total, num_replicas)][:selected]


class _RepeatedEpoch(DistributedSampler):
    """DistributedSampler whose epoch is the repeated order (the seeded shuffle of DistributedSampler: seed + epoch);
    `num_samples` (its length) is the number of samples one process draws per epoch."""
    repeats = 1

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        return iter(repeated_order(order, self.repeats, self.num_replicas, self.rank, self.num_samples))


class RepeatAugSampler(StatefulDistributedSampler, _RepeatedEpoch):
    """timm's RepeatAugSampler (`--aug-repeats N`, the semantics of DeiT's RASampler with N = 3) with the state of
    torchdata's StatefulDistributedSampler, so a run resumed mid-epoch continues with the next unseen index.

    The order depends on seed + epoch only (timm seeds with the epoch alone: the same order at seed 0). Each process
    draws floor(len(dataset) // 256 * 256 / num_replicas) indices per epoch (timm's `selected_round` 256; datasets
    smaller than 256 images: ceil(len / num_replicas)), never more than the repeated list holds.
    """

    def __init__(self, dataset: Dataset, repeats: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 selected_round: int = 256):
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f'data.aug_repeats must be a positive number of copies per image, got {repeats!r}')
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = repeats
        size = len(dataset)
        if size >= selected_round:
            selected = size // selected_round * selected_round // num_replicas
        else:
            selected = math.ceil(size / num_replicas)
        self.num_samples = min(selected, math.ceil(size * repeats / num_replicas))
