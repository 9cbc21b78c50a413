"""Our top-1 / top-5 (zoo eval, classification) and mIoU / mAcc / aAcc (segmentation) against torchmetrics on random
predictions."""
import pytest
import torch
from torch import nn

from conftest import require
from zoo.tasks.classification import evaluate
from zoo.tasks.segmentation import confusion_matrix, segmentation_metrics


class FixedLogits(nn.Module):
    """A classifier whose 'image' i (a (1, 1, 1) tensor holding i) gets row i of a fixed logit table."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer('logits', logits)
        self.num_classes = logits.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten().long()]


@pytest.mark.parametrize('num_classes', [3, 10, 37])
def test_top1_top5_match_torchmetrics(num_classes):
    metrics = require('torchmetrics', "pip install -e '.[test]'")
    generator = torch.Generator().manual_seed(num_classes)
    count = 203  # not a multiple of the batch size
    logits = torch.randn(count, num_classes, generator=generator)
    labels = torch.randint(num_classes, (count,), generator=generator)
    dataset = [(torch.full((1, 1, 1), float(i)), int(labels[i])) for i in range(count)]
    ours = evaluate(FixedLogits(logits), dataset, batch_size=16, workers=0)
    for key, k in (('top1', 1), ('top5', min(5, num_classes))):
        accuracy = metrics.classification.MulticlassAccuracy(num_classes, top_k=k, average='micro')
        assert ours[key] == pytest.approx(100 * accuracy(logits, labels).item(), abs=1e-4), key
    assert ours['images'] == count


def test_miou_macc_aacc_match_torchmetrics():
    """Random label maps with ignored pixels, a class never in the truth but predicted, and one in neither."""
    metrics = require('torchmetrics', "pip install -e '.[test]'")
    num_classes, ignore = 6, 255
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(4, (5, 33, 47), generator=generator)  # classes 0..3 in the truth
    target[torch.rand(target.shape, generator=generator) < 0.1] = ignore
    pred = torch.randint(5, (5, 33, 47), generator=generator)  # class 4 only predicted, class 5 in neither
    ours = segmentation_metrics(confusion_matrix(pred, target, num_classes, ignore))

    classification = metrics.classification
    jaccard = classification.MulticlassJaccardIndex(num_classes, average='macro', ignore_index=ignore)
    assert ours['mIoU'] == pytest.approx(100 * jaccard(pred, target).item(), abs=1e-4)
    pixel_accuracy = classification.MulticlassAccuracy(num_classes, average='micro', ignore_index=ignore)
    assert ours['aAcc'] == pytest.approx(100 * pixel_accuracy(pred, target).item(), abs=1e-4)
    # mAcc follows mmseg: the mean recall of the classes in the truth. torchmetrics' macro average also counts a class
    # that is only predicted (recall 0), so compare against its per-class recall over the truth's classes.
    recall = classification.MulticlassAccuracy(num_classes, average='none', ignore_index=ignore)(pred, target)
    in_truth = torch.bincount(target[target != ignore], minlength=num_classes) > 0
    assert in_truth.tolist() == [True] * 4 + [False] * 2
    assert ours['mAcc'] == pytest.approx(100 * recall[in_truth].mean().item(), abs=1e-4)
