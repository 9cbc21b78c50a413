"""Tour: the zoo's model table, then one model through the paths a user takes.

1. every registered model with its parameter count (built on the meta device) and official top-1;
2. dinat_mini: classify a batch, save the weights as safetensors, reload them through timm's pretrained-file
   path (the path official checkpoints take) and check the logits are identical;
3. the same weights as a `features_only` backbone: feature maps at strides 4, 8, 16, 32;
4. the neighborhood attention operator against a dense masked-softmax computation of the same definition.
Runs in about a minute on a 2-core CPU.
"""
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import zoo
from zoo.layers import neighborhood_attention_2d, neighborhood_indices
from zoo.manifest import official_entry


def model_table() -> None:
    print(f'{"model":<24}{"params(M)":>10}{"top-1":>8}')
    for name in zoo.list_models():
        with torch.device('meta'):
            params = sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6
        entry = official_entry(name)
        top1 = f'{entry["top1"]:.1f}' if entry and entry.get('top1') else '-'
        print(f'{name:<24}{params:>10.2f}{top1:>8}')


def round_trip(workdir: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model('dinat_mini', num_classes=10).eval()
    images = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(images)
    print(f'\ndinat_mini forward, batch 2 at 224x224: {time.perf_counter() - start:.2f} s, logits {tuple(logits.shape)}')
    path = workdir / 'dinat_mini.safetensors'
    save_file(model.state_dict(), str(path))
    reloaded = timm.create_model('dinat_mini', num_classes=10, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    backbone = timm.create_model('dinat_mini', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(images), logits)
        features = backbone(images)
    print(f'reloaded from {path.name} through the pretrained-file path: identical logits = {same}')
    print('features_only maps: ' + ', '.join(f'stride {s}: {tuple(f.shape)}'
                                             for s, f in zip(backbone.feature_info.reduction(), features)))
    if not same:
        raise SystemExit('round trip changed the logits')


def operator_check() -> None:
    """Dense attention with a mask built from the per-axis windows must equal the gather-based operator."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 15, 8, dtype=torch.float64) for _ in range(3))
    rows, _ = neighborhood_indices(12, 5, 2)
    cols, _ = neighborhood_indices(15, 5, 2)
    allowed = torch.zeros(12, 15, 12, 15, dtype=torch.bool)
    for i in range(12):
        for j in range(15):
            allowed[i, j, rows[i][:, None], cols[j][None, :]] = True
    scores = torch.einsum('bhijd,bhmnd->bhijmn', q, k) * 8 ** -0.5
    dense = scores.masked_fill(~allowed, float('-inf')).flatten(-2).softmax(-1)
    expected = torch.einsum('bhijn,bhnd->bhijd', dense, v.flatten(2, 3))
    error = (neighborhood_attention_2d(q, k, v, 5, dilation=2) - expected).abs().max().item()
    print(f'\nneighborhood_attention_2d (k=5, dilation 2, 12x15) vs dense masked attention: max |diff| {error:.1e}')
    if error > 1e-10:
        raise SystemExit('operator disagrees with the dense definition')


def main() -> None:
    model_table()
    with tempfile.TemporaryDirectory() as tmp:
        round_trip(Path(tmp))
    operator_check()
    print("\ntour finished: see README.md for training, evaluation and benchmarks")


if __name__ == '__main__':
    main()
