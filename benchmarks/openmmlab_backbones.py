"""Training-step time (and peak CUDA memory) of the OpenMMLab backbones, against timm baselines in the same run.

Each backbone is built from a config in configs/openmmlab/ exactly as mmdet/mmseg would (mmengine Config +
root MODELS registry); the baselines are timm's `convnext_tiny` and `swin_tiny_patch4_window7_224` through the
generic `ZooBackbone`. A step is forward + backward of the sum of all output maps (what a detector / segmentor
neck would receive) at --size x --size. Also measured: the same backbone as a bare timm `features_only` model,
so the `wrapper` column is the adapter's own overhead (extra output norms included).

    PYTHONPATH=. .venv/bin/python benchmarks/openmmlab_backbones.py --size 128 --batch 1 --repeats 3
    PYTHONPATH=. .venv/bin/python benchmarks/openmmlab_backbones.py --device cuda --size 512 --batch 2

Times are medians over --repeats steps after one warm-up step; peak memory is reported on CUDA only
(torch.cuda.max_memory_allocated), as CPU allocations have no per-model peak counter.
"""
import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS

import zoo.integrations.openmmlab  # noqa: F401  (registers the backbone types)

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'openmmlab' / 'mmdet'
DEFAULT_CONFIGS = ['mask_rcnn_nat_tiny_fpn_3x_coco.py', 'mask_rcnn_transnext_tiny_fpn_1x_coco.py',
                   'mask_rcnn_overlock_t_fpn_1x_coco.py']
BASELINES = ['convnext_tiny', 'swin_tiny_patch4_window7_224']


def train_step(model: nn.Module, images: torch.Tensor) -> None:
    """One forward + backward of the summed outputs; (B, 3, S, S) images."""
    model.zero_grad(set_to_none=True)
    feats = model(images)
    sum(f.float().sum() for f in feats).backward()


def measure(model: nn.Module, images: torch.Tensor, repeats: int) -> Dict[str, Optional[float]]:
    """Median step time in ms and peak CUDA memory in MiB (None on CPU)."""
    cuda = images.is_cuda
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    train_step(model, images)  # warm-up (lazy init, allocator)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step(model, images)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    return {'ms': statistics.median(times), 'peak_mib': peak}


def rows(args) -> List[Dict]:
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    out = []
    for name in BASELINES:
        kwargs = dict(img_size=args.size) if name.startswith('swin') else {}
        model = MODELS.build(dict(type='ZooBackbone', model_name=name, **kwargs)).to(device)
        out.append(dict(name=name, **measure(model, images, args.repeats), wrapper=None))
    for cfg_name in args.configs:
        backbone_cfg = Config.fromfile(str(CONFIG_DIR / cfg_name)).model.backbone
        model = MODELS.build(backbone_cfg).to(device)
        wrapped = measure(model, images, args.repeats)
        bare = measure(model.body, images, args.repeats)
        out.append(dict(name=f'{backbone_cfg.type} ({cfg_name})', **wrapped, wrapper=wrapped['ms'] / bare['ms']))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS, help='file names in configs/openmmlab/mmdet')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = rows(args)
    base = results[0]['ms']
    print(f'# {datetime.date.today()} {platform.machine()} torch {torch.__version__} timm {timm.__version__} '
          f'device {args.device} threads {torch.get_num_threads()} size {args.size} batch {args.batch}')
    print(f'| backbone | train step ms | vs {BASELINES[0]} | adapter / bare timm | peak MiB |')
    print('|---|---|---|---|---|')
    for row in results:
        wrapper = '–' if row['wrapper'] is None else f"{row['wrapper']:.2f}x"
        peak = '–' if row['peak_mib'] is None else f"{row['peak_mib']:.0f}"
        print(f"| {row['name']} | {row['ms']:.0f} | {row['ms'] / base:.2f}x | {wrapper} | {peak} |")


if __name__ == '__main__':
    main()
