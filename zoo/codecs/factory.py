"""Codecs by name, and codec files: creating, saving and loading the zoo's learned image codecs.

A codec is a CompressAI `CompressionModel`: one of the zoo's registered codecs (`s2lic`, `s2lic_small`, `s2lic_tiny`,
built through timm like every zoo model) or one of CompressAI's architectures as `compressai:<zoo name>` (randomly
initialised, never downloaded).

A codec file is one safetensors file: the weights with current CDF tables, and JSON metadata under the key
`zoo_codec` = {'format': 'zoo-codec', 'version': 1, 'model', 'quality', 'kwargs' (constructor arguments), plus what
the trainer records (lmbda, metric, recipe, held-out bpp and PSNR)}.
"""
import inspect
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from compressai.models import CompressionModel

from zoo.layers.entropy_tables import mark_tables_current, refresh_tables
from zoo.files import atomic_write_bytes
from zoo.manifest import verify_listed_checkpoint

__all__ = ['COMPRESSAI_PREFIX', 'CHECKPOINT_FORMAT', 'compressai_architecture', 'create_codec', 'save_codec',
           'load_codec']

COMPRESSAI_PREFIX = 'compressai:'
CHECKPOINT_FORMAT = 'zoo-codec'
_METADATA_KEY = 'zoo_codec'


def compressai_architecture(name: str) -> type:
    """The CompressAI model class behind `compressai:<zoo name>` (e.g. ScaleHyperprior for bmshj2018-hyperprior)."""
    from compressai.zoo.image import cfgs, model_architectures
    zoo_name = name[len(COMPRESSAI_PREFIX):] if name.startswith(COMPRESSAI_PREFIX) else name
    available = sorted(set(model_architectures) & set(cfgs))
    if zoo_name not in available:
        raise ValueError(f'unknown CompressAI model {name!r}; available: '
                         f'{", ".join(COMPRESSAI_PREFIX + n for n in available)}')
    return model_architectures[zoo_name]


def create_codec(name: str, quality: Optional[int] = None, **kwargs) -> CompressionModel:
    """A randomly initialised codec by name.

    `compressai:<zoo name>` builds CompressAI's architecture with that quality's channel counts (quality required;
    `kwargs` such as N, M override them, e.g. a reduced ScaleHyperprior); no weights are downloaded. Other names are
    zoo codecs built with `timm.create_model(name, **kwargs)`; for them `quality` is only a label.

    Raises:
        ValueError: unknown name, unsupported quality or argument, or a model that is not a CompressionModel.
    """
    if name.startswith(COMPRESSAI_PREFIX):
        from compressai.zoo.image import cfgs
        architecture = compressai_architecture(name)
        qualities = cfgs[name[len(COMPRESSAI_PREFIX):]]
        if quality not in qualities:
            raise ValueError(f'{name} needs a quality in {sorted(qualities)}, got {quality!r}')
        names = [p for p in inspect.signature(architecture.__init__).parameters if p not in ('self', 'kwargs')]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f'unknown arguments {unknown} for {name}; allowed: {", ".join(names)}')
        codec = architecture(**{**dict(zip(names, qualities[quality])), **kwargs})
    else:
        import timm
        if not timm.is_model(name):
            raise ValueError(f'unknown codec {name!r}: a zoo codec (s2lic, s2lic_small, s2lic_tiny) or '
                             f'{COMPRESSAI_PREFIX}<CompressAI zoo name>')
        codec = timm.create_model(name, **kwargs)
    if not isinstance(codec, CompressionModel):
        raise ValueError(f'{name} is not an image codec (a compressai CompressionModel), got {type(codec).__name__}')
    return codec


def save_codec(codec: CompressionModel, path, model_name: str, quality: int, metadata: Dict) -> Path:
    """Write the codec's weights and refreshed CDF tables as safetensors, atomically, with JSON metadata
    {'format', 'model', 'quality', 'kwargs' (constructor arguments), + `metadata` (lmbda, metric, ...)}."""
    from safetensors.torch import save
    refresh_tables(codec)
    record = {'format': CHECKPOINT_FORMAT, 'version': 1, 'model': model_name, 'quality': quality, 'kwargs': {},
              **metadata}
    tensors = {key: value.detach().cpu().contiguous() for key, value in codec.state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={_METADATA_KEY: json.dumps(record)}))
    return path


def load_codec(path) -> Tuple[CompressionModel, Dict]:
    """(codec in eval mode on the CPU, metadata) from a file written by `save_codec`; the CDF tables stored with the
    weights are used as they are (they were refreshed when saved).

    Raises:
        ValueError: missing, truncated or corrupt file, a safetensors file that is not a zoo codec, or weights that
            do not fit the recorded model.
        zoo.manifest.ChecksumError (a ValueError): a file checkpoints/manifest.yaml lists with another sha256.
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'codec checkpoint not found: {path}')
    verify_listed_checkpoint(path)
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f'{path}: not a readable safetensors file (truncated or corrupt?): {err}') from None
    try:
        record = json.loads(metadata[_METADATA_KEY])
        if record.get('format') != CHECKPOINT_FORMAT or not isinstance(record.get('kwargs'), dict):
            raise ValueError(record.get('format'))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError(f'{path}: not a zoo codec checkpoint (no valid {_METADATA_KEY!r} metadata; codecs are saved '
                         f'by zoo.codecs.save_codec)') from None
    codec = create_codec(record['model'], record.get('quality'), **record['kwargs'])
    try:
        codec.load_state_dict(tensors)  # CompressionModel resizes its CDF buffers to the stored tables first
    except (RuntimeError, KeyError) as err:  # CompressionModel reads its table buffers by name: a KeyError
        raise ValueError(f'{path}: the weights do not fit {record["model"]} {record["kwargs"]}: {err}') from None
    mark_tables_current(codec)
    return codec.eval(), record
