"""Keeping a CompressAI codec's CDF tables current: the one freshness mechanism of the zoo's codecs.

A range coder codes with integer CDF tables that `CompressionModel.update()` builds from the entropy models. They go
stale silently: after a training step the EntropyBottleneck's parameters have moved but the tables have not, and a
stream coded with them is larger than it should be (or, if encoder and decoder refresh at different times,
undecodable). The tables are current when none is empty and the EntropyBottleneck parameters equal those they were
built from; the GaussianConditional tables depend only on its fixed scale table, so their emptiness is all that can
make them stale.

What the tables were built from is recorded as a CRC of the EntropyBottleneck parameters, kept on the codec by
`mark_tables_current` (done by `refresh_tables`) and, for a codec passed to `track_loaded_tables`, by every
`load_state_dict` that brings non-empty tables with it: a state dict saved with current tables (the zoo's codec
files, S2LIC's own state_dict) loads as current.
"""
import zlib
from typing import List

import torch.nn as nn
from compressai.entropy_models import EntropyBottleneck, GaussianConditional

__all__ = ['entropy_models', 'tables_missing', 'tables_stale', 'mark_tables_current', 'refresh_tables',
           'tables_crc', 'track_loaded_tables']

_TABLE_BUFFERS = ('_quantized_cdf', '_offset', '_cdf_length')
# set on a codec when its CDF tables were built from (or loaded together with) its current parameters
_SOURCE_ATTR = '_zoo_tables_source_crc'


def entropy_models(codec: nn.Module) -> List[nn.Module]:
    """The codec's EntropyBottleneck and GaussianConditional modules, in module order."""
    return [m for m in codec.modules() if isinstance(m, (EntropyBottleneck, GaussianConditional))]


def _parameters_crc(codec: nn.Module) -> int:
    """CRC-32 of every EntropyBottleneck parameter: what the bottleneck's tables are computed from."""
    crc = 0
    for module in codec.modules():
        if isinstance(module, EntropyBottleneck):
            for param in module.parameters():
                crc = zlib.crc32(param.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def _is_meta(codec: nn.Module) -> bool:
    return any(p.is_meta for p in codec.parameters())


def tables_missing(codec: nn.Module) -> bool:
    """True when some entropy model has no table yet (update() never ran)."""
    return any(m._offset.numel() == 0 or m._quantized_cdf.numel() == 0 for m in entropy_models(codec))


def tables_stale(codec: nn.Module) -> bool:
    """True when a table is missing or the EntropyBottleneck parameters changed since the tables were built."""
    return tables_missing(codec) or getattr(codec, _SOURCE_ATTR, None) != _parameters_crc(codec)


def mark_tables_current(codec: nn.Module) -> None:
    """Record that the codec's tables were built from its current parameters."""
    setattr(codec, _SOURCE_ATTR, _parameters_crc(codec))


def refresh_tables(codec: nn.Module) -> bool:
    """`codec.update(force=True)` when the tables are stale; returns whether it rebuilt them.

    A meta-device codec (built only to count parameters) has no tables and is left alone.

    Raises:
        ValueError: the module has no entropy model, so it is not a codec.
    """
    if not entropy_models(codec):
        raise ValueError(f'{type(codec).__name__} has no EntropyBottleneck/GaussianConditional: not a codec')
    if _is_meta(codec) or not tables_stale(codec):
        return False
    codec.update(force=True)
    mark_tables_current(codec)
    return True


def tables_crc(codec: nn.Module) -> int:
    """CRC-32 of the CDF tables the range coder uses: encoder and decoder must agree on it or decoding is garbage."""
    crc = 0
    for module in entropy_models(codec):
        for name in _TABLE_BUFFERS:
            crc = zlib.crc32(getattr(module, name).detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def _mark_loaded_tables(codec: nn.Module, incompatible_keys) -> None:
    if not tables_missing(codec) and not _is_meta(codec):
        mark_tables_current(codec)


def track_loaded_tables(codec: nn.Module) -> None:
    """Mark the tables current whenever `codec.load_state_dict` brings tables with it.

    Only for codecs whose saved state dicts always hold current tables (S2LIC refreshes them in state_dict(), the
    zoo's codec files refresh them before saving); a CompressAI model saved mid-training would carry stale ones.
    """
    codec.register_load_state_dict_post_hook(_mark_loaded_tables)
