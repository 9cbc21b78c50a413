"""Parameters and GMACs of every registered zoo model at its default input size, written to
benchmarks/model_stats.json: the table `zoo list` shows. Counting on real tensors costs seconds of CPU per GMAC
here (over an hour for the zoo), so the counts run on the meta device (about a second a model) and are stored;
tests/cli/test_list_push.py re-measures a few entries.

MACs are zoo.bench.count_macs (torch's FlopCounterMode / 2, plus the attention MACs a layer reports through
`macs_not_counted`), as `zoo bench --device cpu` counts them. On the meta device torch decomposes
scaled_dot_product_attention into matmuls the counter sees, while on the CPU its fused kernel is invisible to it; a
layer that reports the MACs of attention it runs through that function would count twice on meta, so the families in
CPU_COUNTED are counted on the CPU (tests/cli/test_list_push.py checks per family that the meta count equals the CPU
count everywhere else).

    PYTHONPATH=. .venv/bin/python benchmarks/model_stats.py [--output benchmarks/model_stats.json]
"""
import argparse
import datetime
import fnmatch
import json
from pathlib import Path

import timm
import torch

import zoo
from zoo.bench import count_macs
from zoo.manifest import MODEL_STATS_PATH

# Sparsifiner's masked attention runs through scaled_dot_product_attention and its layers report its MACs themselves
CPU_COUNTED = ('sparsifiner_*',)


def _count(name: str, size: tuple, device: str) -> tuple:
    """(model, MACs of one forward of a batch of 1 at `size`) with the model built and run on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name).eval()
        return model, count_macs(model, torch.rand(1, *size))


def measure(name: str) -> dict:
    """{'input_size', 'params_m', 'gmacs'} of one forward of batch 1 at the model's default input size: on the meta
    device (shapes only), or on the CPU for the CPU_COUNTED families and for a model whose forward reads tensor values
    (the codecs' entropy models)."""
    size = tuple(timm.models.get_pretrained_cfg(name).input_size)
    on_cpu = any(fnmatch.fnmatch(name, pattern) for pattern in CPU_COUNTED)
    if not on_cpu:
        try:
            model, macs = _count(name, size, 'meta')
        except RuntimeError as err:  # Tensor.item() and the like cannot run on the meta device
            if 'meta' not in str(err):
                raise
            on_cpu = True
    if on_cpu:
        model, macs = _count(name, size, 'cpu')
    params = sum(p.numel() for p in model.parameters())
    return {'input_size': list(size), 'params_m': round(params / 1e6, 3), 'gmacs': round(macs / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default=str(MODEL_STATS_PATH))
    args = parser.parse_args()
    models = {}
    for name in zoo.list_models():
        models[name] = measure(name)
        print(name, models[name], flush=True)
    table = {'about': 'params (M) and GMACs (multiply-accumulates / 1e9) of one forward, batch 1, at each model\'s '
                      'default input size; written by benchmarks/model_stats.py',
             'date': datetime.date.today().isoformat(), 'torch': torch.__version__, 'timm': timm.__version__,
             'models': models}
    Path(args.output).write_text(json.dumps(table, indent=1) + '\n')


if __name__ == '__main__':
    main()
