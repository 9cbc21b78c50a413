"""Where and how `zoo eval` runs a model: the device, mixed precision, memory format, and the results file.

Every task's evaluation takes an `Inference` (built from the shared `zoo eval` flags by `Inference.from_args`) and
moves its model and batches through it, so that `--device cuda --amp --channels-last` mean the same for
classification, detection and segmentation. The flags follow timm's validate.py where it has one.
"""
import argparse
import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
import torch.nn as nn

from zoo.files import atomic_write_bytes

__all__ = ['Inference', 'resolve_device', 'add_inference_arguments', 'add_task_eval_arguments', 'output_file',
           'write_results',
           'AMP_DTYPES']

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def resolve_device(name: Optional[str]) -> torch.device:
    """`--device` -> a torch.device: None means CUDA when available, else the CPU.

    Raises:
        ValueError: a name torch does not know, or a device this machine does not have.
    """
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a device name (cpu, cuda, cuda:1, mps)') from None
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'--device {name}: no CUDA device is available here (torch {torch.__version__}, CUDA '
                             f'build: {torch.version.cuda or "no"})')
        if device.index is not None and device.index >= count:
            raise ValueError(f'--device {name}: this machine has {count} CUDA device(s)')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'--device {name}: MPS is not available here')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'--device {name}: only cpu, cuda and mps are supported')
    return device


@dataclass(frozen=True)
class Inference:
    """How an evaluation runs its model.

    device: where model and batches live.
    amp_dtype: autocast dtype (float16 / bfloat16), or None for full precision.
    channels_last: NHWC memory format for model and image batches (faster convolutions on most hardware).
    """
    device: torch.device = torch.device('cpu')
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'Inference':
        """From the flags of `add_inference_arguments`; --amp alone picks bfloat16 on the CPU and float16 on CUDA."""
        device = resolve_device(args.device)
        amp_dtype = None
        if args.amp or args.amp_dtype:
            default = 'float16' if device.type == 'cuda' else 'bfloat16'
            amp_dtype = AMP_DTYPES[args.amp_dtype or default]
        return cls(device, amp_dtype, args.channels_last)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` in eval mode on the device, in the memory format."""
        model = model.to(self.device).eval()
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images on the device, in the memory format."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def autocast(self) -> ContextManager:
        """Mixed precision for the forward passes, when asked for."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        """Wait for queued device work, so that a timing covers it."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def describe(self) -> Dict[str, Any]:
        """What the results file records about the run."""
        return {'device': str(self.device), 'amp': str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else
                None, 'channels_last': self.channels_last}


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The `zoo eval` / `zoo predict` flags that choose device, precision and memory format."""
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:N or mps (default: cuda when available)')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: bfloat16 on the CPU, float16 on CUDA (or --amp-dtype)')
    parser.add_argument('--amp-dtype', default=None, choices=sorted(AMP_DTYPES), help='autocast dtype (implies --amp)')
    parser.add_argument('--channels-last', action='store_true', help='NHWC memory format for model and images')


def add_task_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Each task's own `zoo eval` flags, a group per task. They are declared here rather than in the task modules
    so that building the command line imports no task: a task module loads its training stack (Lightning,
    CompressAI), and a command imports only the task it runs."""
    group = parser.add_argument_group('classification options')
    group.add_argument('--num-classes', type=int, default=None, help='classes of --model with a weights file')
    group.add_argument('--shapes-size', type=int, default=1000, help="images in the shapes validation split "
                                                                     "(--data shapes)")
    group.add_argument('--img-size', type=int, default=None, help="square input size (default: the model's cfg)")
    group.add_argument('--crop-pct', type=float, default=None, help="centre-crop fraction (default: the model's cfg)")
    group = parser.add_argument_group('detection options')
    group.add_argument('--ann-file', default=None, help='COCO json of the images in --data')
    group = parser.add_argument_group('segmentation options')
    group.add_argument('--recipe', default=None,
                       help="the run's recipe.yaml, for a segmenter.pt or .ckpt (default: the run folder's)")
    group = parser.add_argument_group('compression options')
    group.add_argument('--baseline-checkpoint', action='extend', nargs='+', default=[],
                       help='checkpoints of the baseline codec (e.g. compressai:bmshj2018-hyperprior trained with the '
                            'same recipe), one per quality')
    group.add_argument('--anchor', default=None,
                       help='the curve BD-rates are reported against (a classic codec or a model name; default: jpeg '
                            'when measured, else the baseline, else the first model)')
    group.add_argument('--classic', nargs='*', default=['jpeg', 'webp', 'avif', 'jpeg2000'],
                       help='Pillow codecs measured on the same images (none: --classic with no value)')
    group.add_argument('--plot', default=None, type=output_file('.png', '.pdf', '.svg'),
                       help='write the RD plot to this PNG (or PDF, SVG)')


def output_file(*suffixes: str) -> Callable[[str], str]:
    """An argparse `type` for a file a command writes when its work is done: a name without one of `suffixes`
    (lower-case, with the dot) is refused when the command starts, not after an evaluation of minutes."""
    names = ' or '.join(filter(None, (', '.join(suffixes[:-1]), suffixes[-1])))

    def check(path: str) -> str:
        if Path(path).suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f'{path}: use a {names} file name')
        return path
    return check


def write_results(metrics: Dict[str, Any], path: str) -> None:
    """The metrics as JSON (`.json`) or as a one-row CSV with a header (`.csv`), written atomically.

    Raises:
        ValueError: another file extension.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == '.json':
        text = json.dumps(metrics, indent=1) + '\n'
    elif suffix == '.csv':
        buffer = io.StringIO()
        flat = {key: json.dumps(value) if isinstance(value, (dict, list)) else value for key, value in metrics.items()}
        writer = csv.DictWriter(buffer, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
        text = buffer.getvalue()
    else:
        raise ValueError(f'--results-file {path}: use a .json or .csv file name')
    atomic_write_bytes(target, text.encode())
