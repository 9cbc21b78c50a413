"""Checkpoint files and their wrappers, the same way for every family: `unwrap_state_dict` (what each family's
`checkpoint_filter_fn` starts with) and `read_state_dict` (a weights file from disk, never unpickling code).

Private (leading underscore), so `zoo.models` does not take it for a family.
"""
import argparse
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from safetensors.torch import load_file
from timm.models import clean_state_dict

__all__ = ['WRAPPER_KEYS', 'unwrap_state_dict', 'read_state_dict', 'read_checkpoint']

# Keys under which training scripts nest the weights, most preferred first. The first four are timm's
# `load_state_dict` order with its default use_ema=True (timm train.py writes 'state_dict' / 'state_dict_ema',
# DeiT-style scripts 'model' / 'model_ema'): timm unwraps a `pretrained_cfg_overlay=dict(file=...)` that way before
# a family's filter runs, so keeping its order means a file gives the same tensors whichever path reads it. The
# EMA weights come first because they are the ones such runs evaluate and publish. 'module' is DeepSpeed's.
WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'module')
_EMA_KEYS = ('state_dict_ema', 'model_ema')


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: raw, or nested under the first of WRAPPER_KEYS it has (repeatedly,
    for wrappers inside wrappers), with DDP 'module.' / torch.compile '_orig_mod.' key prefixes removed
    (timm's clean_state_dict).

    Args:
        checkpoint: a state dict or a training checkpoint holding one.
        use_ema: take an EMA copy when there is one (timm's default); False skips 'state_dict_ema' / 'model_ema'.

    Returns:
        {name: tensor}. ValueError when `checkpoint` is not a mapping or what it holds is not all tensors.
    """
    keys = WRAPPER_KEYS if use_ema else tuple(k for k in WRAPPER_KEYS if k not in _EMA_KEYS)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}')
    wrapper = next((k for k in keys if isinstance(checkpoint.get(k), Mapping)), None)
    while wrapper is not None:
        checkpoint = checkpoint[wrapper]
        wrapper = next((k for k in keys if isinstance(checkpoint.get(k), Mapping)), None)
    others = sorted(str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f'not a state dict: entries {others[:8]} are not tensors and none of {list(keys)} holds '
                         f'the weights')
    return clean_state_dict(checkpoint)


def read_state_dict(path: Union[str, Path], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict of a weights file on disk (`read_checkpoint`), then `unwrap_state_dict(..., use_ema)`.

    FileNotFoundError when there is no file; ValueError naming the file when it is truncated, not a weights
    file, pickles objects other than tensors and containers, or holds no state dict.
    """
    checkpoint = read_checkpoint(path)
    try:
        return unwrap_state_dict(checkpoint, use_ema)
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from error


def read_checkpoint(path: Union[str, Path]) -> Any:
    """What a weights file on disk holds, on the CPU: safetensors (by the `.safetensors` suffix) or a torch file
    read with `weights_only=True`, which refuses pickled code (argparse.Namespace, plain data, is allowed).

    FileNotFoundError when there is no file; ValueError naming the file when it is truncated, not a weights file or
    pickles objects other than tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.safetensors':
            checkpoint = load_file(str(path), device='cpu')
        else:
            # training checkpoints carry their argparse.Namespace of arguments (timm's loader allows it too)
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except PermissionError:
        raise
    except Exception as error:  # noqa: BLE001
        # a damaged or foreign file fails inside the readers in many ways (UnpicklingError, EOFError, KeyError and
        # IndexError from the weights-only unpickler, SafetensorError, OSError for a truncated zip archive); each is
        # this file's fault, told as one line. An unreadable file stays a PermissionError.
        raise ValueError(_unreadable_message(path, error)) from error
    return checkpoint


def _unreadable_message(path: Union[str, Path], error: BaseException) -> str:
    """The one-line message for a weights file a loader could not read. torch's refusal under weights_only is a
    page of advice (including to load the file unsafely); only its WeightsUnpickler detail is the reason."""
    text = str(error)
    detail = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)', text, re.S)
    reason = (detail.group(1) if detail else text).strip().splitlines()
    return (f'{path}: not a readable weights file (truncated, another format, or pickled objects that weights_only '
            f'loading refuses): {type(error).__name__}' + (f': {reason[0]}' if reason else ''))
