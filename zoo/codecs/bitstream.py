"""A self-describing, checksummed bitstream container around any CompressAI-style codec.

`compress_image` pads an 8-bit RGB image to the codec's `pad_multiple`, runs `codec.compress` and writes

    offset  size        field
    0       4           magic b'ZLIC'
    4       1           format version (1)
    5       1           n = length of the model name (1..64)
    6       n           model name, UTF-8
    6+n     1           quality (0..255)
            2, 2        height, width of the original image (u16 each)
            1           k = number of latent dimensions (1..4), then k x u32 latent shape (`codec.compress()['shape']`)
            1           s = number of latent strings (1..8), then s x u32 string lengths
            4           CRC-32 of the codec's entropy tables (CDFs, offsets, lengths)
            ...         the s strings, concatenated
            4           CRC-32 of every byte above

(little-endian). `decompress_image` checks magic, version, every length and both checksums before any
entropy decoder runs, so a truncated, corrupted or foreign stream (a PNG, random bytes, another model's or
another checkpoint's stream) is a `BitstreamError` naming the problem, never a hang inside the rANS decoder or
a silently wrong image. Image sizes are bounded (`MAX_PIXELS`) so a header cannot make the decoder allocate
absurd amounts of memory.

Decoding reproduces the encoder's pixels only with the same weights and entropy tables (the tables CRC checks
this) on the same platform/numerics: the hyper and context networks run in floating point, so a different CPU
or GPU can index different Gaussian tables (CompressAI issues #279, #309). Within one machine the result does
not depend on the caller's thread count: coding and `reconstruct_image` run on one CPU thread (tested with a
fresh process).
"""
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.layers.entropy_tables import refresh_tables, tables_crc

__all__ = ['BitstreamError', 'BitstreamHeader', 'compress_image', 'decompress_image', 'read_header',
           'reconstruct_image', 'forward_reconstruction', 'to_uint8', 'check_rgb', 'padded_input', 'MAGIC',
           'FORMAT_VERSION', 'MAX_PIXELS']

MAGIC = b'ZLIC'
FORMAT_VERSION = 1
# 8192 x 8192: the largest image a header may announce (bounds the decoder's allocations)
MAX_PIXELS = 1 << 26
MAX_SIDE = 0xFFFF
MAX_NAME_BYTES = 64
MAX_LATENT_DIMS = 4
MAX_STRINGS = 8
DEFAULT_PAD_MULTIPLE = 64
_CRC = struct.Struct('<I')


class BitstreamError(ValueError):
    """A bitstream that cannot be decoded: truncated, corrupted, foreign, or written by another model/weights."""


@dataclass(frozen=True)
class BitstreamHeader:
    """What a bitstream announces about itself (see the module docstring for the byte layout)."""
    version: int
    model: str
    quality: int
    height: int
    width: int
    latent_shape: Tuple[int, ...]
    string_lengths: Tuple[int, ...]
    tables_crc: int
    payload_offset: int

    @property
    def total_bytes(self) -> int:
        return self.payload_offset + sum(self.string_lengths) + _CRC.size


# ---------------------------------------------------------------------------------------------------------------
# images

def check_rgb(image: torch.Tensor) -> None:
    """Raise ValueError unless `image` is an 8-bit RGB image tensor (3, H, W) uint8 of a supported size."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f'expected an image tensor (3, H, W) uint8, got {type(image).__name__}')
    if image.dtype != torch.uint8:
        raise ValueError(f'expected 8-bit pixels (torch.uint8), got {image.dtype}; convert floats in [0, 1] with '
                         f'to_uint8()')
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f'expected an RGB image of shape (3, H, W), got {tuple(image.shape)}; RGB only: convert '
                         f'grayscale/RGBA explicitly (zoo.data.images.load_rgb(path, mode="convert"))')
    height, width = image.shape[1:]
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) or height * width > MAX_PIXELS:
        raise ValueError(f'image size {height}x{width} is outside the supported range (sides 1..{MAX_SIDE}, at most '
                         f'{MAX_PIXELS} pixels)')


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (3, H, W) uint8: clamp, scale by 255, round half to even."""
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# header

class _Reader:
    """Bounds-checked little-endian reads: running past the end is a BitstreamError, never an IndexError."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def read(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise BitstreamError(f'truncated bitstream: it ends inside the header ({what}) after {len(self.data)} '
                                 f'bytes')
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values


def _pack_header(model: str, quality: int, height: int, width: int, latent_shape: Sequence[int],
                 lengths: Sequence[int], tables_crc: int) -> bytes:
    name = model.encode('utf-8')
    if not 1 <= len(name) <= MAX_NAME_BYTES:
        raise ValueError(f'model name must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {model!r}')
    if not 0 <= quality <= 255:
        raise ValueError(f'quality must be an integer 0..255, got {quality!r}')
    if not 1 <= len(latent_shape) <= MAX_LATENT_DIMS or not 1 <= len(lengths) <= MAX_STRINGS:
        raise ValueError(f'codec output not supported by the container: latent shape {tuple(latent_shape)}, '
                         f'{len(lengths)} strings (at most {MAX_LATENT_DIMS} dims and {MAX_STRINGS} strings)')
    return b''.join([
        MAGIC, struct.pack('<BB', FORMAT_VERSION, len(name)), name, struct.pack('<BHH', quality, height, width),
        struct.pack(f'<B{len(latent_shape)}I', len(latent_shape), *latent_shape),
        struct.pack(f'<B{len(lengths)}I', len(lengths), *lengths), _CRC.pack(tables_crc)])


def _describe_foreign(data: bytes) -> str:
    known = {b'\x89PNG': 'a PNG image', b'\xff\xd8\xff': 'a JPEG image', b'RIFF': 'a RIFF/WebP file',
             b'PK\x03\x04': 'a zip file'}
    for prefix, kind in known.items():
        if data.startswith(prefix):
            return kind
    return f'data starting with {data[:8]!r}'


def read_header(data: bytes) -> BitstreamHeader:
    """Parse and validate a bitstream's header, its length and its checksum.

    Raises:
        BitstreamError: not a zoo bitstream, an unsupported version, out-of-range fields, truncated or
            trailing bytes, or a checksum mismatch (corruption).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f'a bitstream is bytes, got {type(data).__name__}')
    data = bytes(data)
    if len(data) == 0:
        raise BitstreamError('empty bitstream (0 bytes)')
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise BitstreamError(f'truncated bitstream: only {len(data)} bytes')
        raise BitstreamError(f'not a zoo image bitstream (magic {MAGIC!r} missing): {_describe_foreign(data)}')
    reader = _Reader(data)
    reader.pos = len(MAGIC)
    version, name_len = reader.read('<BB', 'version')
    if version != FORMAT_VERSION:
        raise BitstreamError(f'bitstream format version {version} is not supported (this reader: {FORMAT_VERSION})')
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise BitstreamError(f'corrupt header: model name length {name_len}')
    (name,) = reader.read(f'<{name_len}s', 'model name')
    quality, height, width = reader.read('<BHH', 'quality and size')
    if height == 0 or width == 0 or height * width > MAX_PIXELS:
        raise BitstreamError(f'corrupt header: image size {height}x{width} (at most {MAX_PIXELS} pixels)')
    (ndim,) = reader.read('<B', 'latent shape')
    if not 1 <= ndim <= MAX_LATENT_DIMS:
        raise BitstreamError(f'corrupt header: latent shape with {ndim} dimensions')
    latent_shape = reader.read(f'<{ndim}I', 'latent shape')
    if any(not 1 <= d <= max(height, width) for d in latent_shape):
        raise BitstreamError(f'corrupt header: latent shape {latent_shape} for a {height}x{width} image')
    (count,) = reader.read('<B', 'string count')
    if not 1 <= count <= MAX_STRINGS:
        raise BitstreamError(f'corrupt header: {count} latent strings')
    lengths = reader.read(f'<{count}I', 'string lengths')
    (tables_crc,) = reader.read('<I', 'tables checksum')
    try:
        model = name.decode('utf-8')
    except UnicodeDecodeError:
        raise BitstreamError(f'corrupt header: model name {name!r} is not UTF-8') from None
    header = BitstreamHeader(version, model, quality, height, width, tuple(latent_shape), tuple(lengths), tables_crc,
                             payload_offset=reader.pos)
    if len(data) < header.total_bytes:
        raise BitstreamError(f'truncated bitstream: the header announces {header.total_bytes} bytes, got {len(data)}')
    if len(data) > header.total_bytes:
        raise BitstreamError(f'{len(data) - header.total_bytes} unexpected trailing bytes after the bitstream '
                             f'({header.total_bytes} bytes announced)')
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[:-_CRC.size]) != stored:
        raise BitstreamError('bitstream checksum mismatch: the data is corrupted')
    return header


# ---------------------------------------------------------------------------------------------------------------
# coding

def _pad_multiple(codec: nn.Module) -> int:
    return int(getattr(codec, 'pad_multiple', DEFAULT_PAD_MULTIPLE))


def padded_input(codec: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, 3, Hp, Wp) float in [0, 1] on the codec's device, replicate-padded at the bottom and
    right to the codec's `pad_multiple`."""
    multiple = _pad_multiple(codec)
    height, width = image.shape[1:]
    x = image.to(_device(codec), torch.float32).div(255).unsqueeze(0)
    return F.pad(x, (0, -width % multiple, 0, -height % multiple), mode='replicate')


def _device(codec: nn.Module) -> torch.device:
    return next(codec.parameters()).device


@contextmanager
def _coding_mode(codec: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and, on CPU, one thread for the duration; the training flag and thread count are
    restored afterwards. oneDNN's convolutions may round differently with another thread count, and the decoder
    must reproduce the encoder's entropy parameters and pixels exactly (CompressAI's eval_model pins one thread
    too)."""
    was_training, threads = codec.training, torch.get_num_threads()
    codec.eval()
    if _device(codec).type == 'cpu':
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)
        codec.train(was_training)


def _flat_strings(strings) -> List[bytes]:
    """compress()'s `strings` (one list per latent, one bytes per batch element) -> one bytes per latent."""
    flat = []
    for entry in strings:
        if isinstance(entry, (list, tuple)) and len(entry) == 1 and isinstance(entry[0], bytes):
            entry = entry[0]
        if not isinstance(entry, bytes):
            raise ValueError('codec.compress() must return strings as a list with one bytes object per latent for a '
                             f'single image, got an element of type {type(entry).__name__}')
        flat.append(entry)
    return flat


def compress_image(codec: nn.Module, image: torch.Tensor, model_name: str, quality: int) -> bytes:
    """Encode an 8-bit RGB image (3, H, W) uint8 into a self-describing bitstream (module docstring).

    The codec's CDF tables are refreshed first when stale or missing; it runs in eval mode (on one CPU thread) and
    its training flag is restored afterwards.
    """
    check_rgb(image)
    refresh_tables(codec)
    with _coding_mode(codec):
        out = codec.compress(padded_input(codec, image))
    strings = _flat_strings(out['strings'])
    latent_shape = [int(d) for d in out['shape']]
    header = _pack_header(model_name, int(quality), image.shape[1], image.shape[2], latent_shape,
                          [len(s) for s in strings], tables_crc(codec))
    body = header + b''.join(strings)
    return body + _CRC.pack(zlib.crc32(body))


def _guarded(string: bytes, padded_size: Tuple[int, int]) -> bytes:
    """`string` followed by zero bytes that no valid stream reaches, so that the range decoder cannot read past it.

    CompressAI's rANS decoder does not check its input's end: a stream whose checksum is valid but whose payload is
    damaged (or was crafted) makes it read on. It reads at most one 32-bit word per decoded symbol, plus the words of
    bypass-coded escapes, whose count the stream's own bits limit (at most 15 per 4-bit chunk); zero words decode
    to symbol 0, which ends any escape. A codec's latents have fewer elements than the padded image has samples, so
    4 bytes per sample and 120 per stream byte bound every read. A valid stream never reads into the padding, so
    it decodes exactly as before.
    """
    height, width = padded_size
    return string + bytes(4 * (3 * height * width + 30 * len(string)) + 16)


def decompress_image(codec: nn.Module, data: bytes, model_name: str) -> torch.Tensor:
    """Decode a bitstream written by `compress_image` for `model_name` -> (3, H, W) uint8 on the CPU.

    Raises:
        BitstreamError: anything wrong with the stream (see `read_header`), a stream of another model, or entropy
            tables that differ from the encoder's (other weights or quality).
    """
    header = read_header(data)
    if header.model != model_name:
        raise BitstreamError(f'the bitstream was written by model {header.model!r} (quality {header.quality}), '
                             f'not {model_name!r}')
    refresh_tables(codec)
    if tables_crc(codec) != header.tables_crc:
        raise BitstreamError(f'the entropy tables of this {model_name} codec differ from the encoder\'s: the stream '
                             f'(quality {header.quality}) was written with other weights')
    multiple = _pad_multiple(codec)
    padded = (header.height + -header.height % multiple, header.width + -header.width % multiple)
    strings, offset = [], header.payload_offset
    for length in header.string_lengths:
        strings.append([_guarded(bytes(data[offset:offset + length]), padded)])
        offset += length
    with _coding_mode(codec):
        try:
            x_hat = codec.decompress(strings, list(header.latent_shape))['x_hat']
        except (RuntimeError, ValueError, IndexError) as err:
            raise BitstreamError(f'the {model_name} decoder rejected the stream (latent shape '
                                 f'{header.latent_shape}): {err}') from err
    if tuple(x_hat.shape) != (1, 3, *padded):
        raise BitstreamError(f'decoded shape {tuple(x_hat.shape)} does not match the header\'s {header.height}x'
                             f'{header.width} image (padded {padded}): the codec does not match the stream')
    return to_uint8(x_hat[0, :, :header.height, :header.width]).cpu()


def forward_reconstruction(codec: nn.Module, image: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One eval-mode forward() of (3, H, W) uint8, with the same padding, cropping, rounding and numerics as
    compress_image/decompress_image -> (reconstruction (3, H, W) uint8 on the CPU, the forward's likelihoods)."""
    check_rgb(image)
    refresh_tables(codec)
    with _coding_mode(codec):
        out = codec(padded_input(codec, image))
    return to_uint8(out['x_hat'][0, :, :image.shape[1], :image.shape[2]]).cpu(), out['likelihoods']


def reconstruct_image(codec: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The eval-mode forward() reconstruction of (3, H, W) uint8 -> (3, H, W) uint8 (`forward_reconstruction`)."""
    return forward_reconstruction(codec, image)[0]
