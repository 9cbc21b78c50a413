"""zoo.codecs.bitstream: round trips equal the eval forward, every damaged or foreign stream is a BitstreamError,
fresh-process decoding with another thread count, automatic CDF-table refresh, RGB checks."""
import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from compressai.models import ScaleHyperprior
from PIL import Image

from conftest import REPO
from zoo.codecs import save_codec
from zoo.codecs.bitstream import (BitstreamError, MAX_PIXELS, compress_image, decompress_image, read_header,
                                  reconstruct_image, to_uint8)
from zoo.data.images import load_rgb

MODEL = 'tiny_hyperprior'


def _codec(seed: int = 0) -> ScaleHyperprior:
    torch.manual_seed(seed)
    return ScaleHyperprior(N=16, M=24)


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth gradient plus noise, (3, H, W) uint8: compresses to a few hundred bytes."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None]
    base = torch.stack([ys * xs, ys.expand(height, width), xs.expand(height, width)])
    return to_uint8(0.8 * base + 0.2 * torch.rand(3, height, width, generator=g))


@pytest.fixture(scope='module')
def codec():
    return _codec()


@pytest.fixture(scope='module')
def stream(codec):
    return compress_image(codec, _image(45, 70), MODEL, 3)


@pytest.mark.parametrize('size', [(45, 70), (64, 64), (1, 130)])
def test_round_trip_equals_eval_forward_on_any_size(codec, size):
    image = _image(*size)
    data = compress_image(codec, image, MODEL, 3)
    header = read_header(data)
    assert (header.model, header.quality, header.height, header.width) == (MODEL, 3, *size)
    decoded = decompress_image(codec, data, MODEL)
    assert decoded.shape == image.shape and decoded.dtype == torch.uint8
    assert torch.equal(decoded, reconstruct_image(codec, image))


def test_compress_is_deterministic_and_restores_training_mode(codec):
    codec.train()
    image = _image(45, 70)
    assert compress_image(codec, image, MODEL, 3) == compress_image(codec, image, MODEL, 3)
    assert codec.training
    codec.eval()


@pytest.mark.parametrize('cut', [0, 1, 4, 5, 12, 20, 33, -30, -5, -1])
def test_truncated_stream_is_a_bitstream_error(codec, stream, cut):
    with pytest.raises(BitstreamError, match='truncated|empty|checksum'):
        decompress_image(codec, stream[:cut], MODEL)


def test_every_single_bit_flip_is_detected(codec, stream):
    for position in range(len(stream)):
        for bit in (0, 7):
            damaged = bytearray(stream)
            damaged[position] ^= 1 << bit
            with pytest.raises(BitstreamError):
                decompress_image(codec, bytes(damaged), MODEL)


def test_trailing_bytes_are_rejected(codec, stream):
    with pytest.raises(BitstreamError, match='trailing'):
        decompress_image(codec, stream + b'\0', MODEL)


def test_foreign_data_is_a_bitstream_error(codec):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format='PNG')
    with pytest.raises(BitstreamError, match='PNG'):
        decompress_image(codec, png.getvalue(), MODEL)
    with pytest.raises(BitstreamError, match='empty'):
        decompress_image(codec, b'', MODEL)
    rng = np.random.default_rng(0)
    for length in (3, 64, 4096):
        with pytest.raises(BitstreamError, match='not a zoo image bitstream'):
            decompress_image(codec, rng.integers(0, 256, length, dtype=np.uint8).tobytes(), MODEL)


def test_stream_of_another_model_or_other_weights_is_rejected(codec, stream):
    with pytest.raises(BitstreamError, match="written by model 'tiny_hyperprior'"):
        decompress_image(codec, stream, 'another_model')
    with pytest.raises(BitstreamError, match='entropy tables'):
        decompress_image(_codec(seed=1), stream, MODEL)


def _forged(height: int, width: int, latent_shape, lengths) -> bytes:
    """A stream with a valid checksum but the given header fields (what an attacker or a bug could write)."""
    name = MODEL.encode()
    body = (b'ZLIC' + struct.pack('<BB', 1, len(name)) + name + struct.pack('<BHH', 3, height, width)
            + struct.pack(f'<B{len(latent_shape)}I', len(latent_shape), *latent_shape)
            + struct.pack(f'<B{len(lengths)}I', len(lengths), *lengths) + struct.pack('<I', 0)
            + bytes(sum(lengths)))
    return body + struct.pack('<I', zlib.crc32(body))


def test_absurd_header_sizes_are_rejected_before_decoding(codec):
    assert 65535 * 65535 > MAX_PIXELS
    with pytest.raises(BitstreamError, match='image size 65535x65535'):
        read_header(_forged(65535, 65535, [1, 1], [4]))
    with pytest.raises(BitstreamError, match='latent shape'):
        read_header(_forged(45, 70, [1, 100000], [4]))
    with pytest.raises(BitstreamError, match='truncated'):
        read_header(_forged(45, 70, [1, 2], [4])[:-8] + struct.pack('<I', 0))
    with pytest.raises(BitstreamError, match='version 9'):
        read_header(b'ZLIC\x09' + bytes(40))


def _with_payload(stream: bytes, latent_shape, payload: bytes, lengths) -> bytes:
    """`stream`'s header with another latent shape and payload, re-checksummed: only the decoder can object."""
    header = read_header(stream)
    name = header.model.encode()
    body = (b'ZLIC' + struct.pack('<BB', 1, len(name)) + name
            + struct.pack('<BHH', header.quality, header.height, header.width)
            + struct.pack(f'<B{len(latent_shape)}I', len(latent_shape), *latent_shape)
            + struct.pack(f'<B{len(lengths)}I', len(lengths), *lengths) + struct.pack('<I', header.tables_crc)
            + payload)
    return body + struct.pack('<I', zlib.crc32(body))


def test_garbage_payload_with_a_valid_checksum_decodes_or_fails_cleanly_in_bounded_time(codec, stream):
    """Random payloads (same lengths, empty strings, a latent shape that does not fit the image) under a valid
    checksum: each is a BitstreamError or an image of the announced size, never a crash or a hang (the strings
    are padded so the range decoder cannot read past them)."""
    header = read_header(stream)
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(60):
        lengths = [int(rng.choice([0, 1, 3, length, 4 * length])) for length in header.string_lengths]
        shape = [int(rng.choice([1, dim, dim + 1])) for dim in header.latent_shape]
        forged = _with_payload(stream, shape, rng.integers(0, 256, sum(lengths), dtype=np.uint8).tobytes(), lengths)
        start = time.perf_counter()
        try:
            image = decompress_image(codec, forged, MODEL)
        except BitstreamError:
            outcomes.add('BitstreamError')
        else:
            assert image.shape == (3, header.height, header.width) and image.dtype == torch.uint8
            outcomes.add('image')
        assert time.perf_counter() - start < 10
    assert outcomes == {'BitstreamError', 'image'}


def test_stale_tables_are_refreshed_before_compressing():
    codec = _codec()
    image = _image(45, 70)
    before = compress_image(codec, image, MODEL, 3)  # a fresh codec: CompressAI alone raises "Uninitialized CDFs"
    optimizer = torch.optim.SGD(codec.parameters(), lr=0.1)
    codec.train()
    out = codec(torch.rand(2, 3, 64, 64))
    (out['x_hat'].mean() - sum(p.log().sum() for p in out['likelihoods'].values()) + codec.aux_loss()).backward()
    optimizer.step()
    after = compress_image(codec, image, MODEL, 3)  # no update() in between
    codec.update(force=True)
    assert after == compress_image(codec, image, MODEL, 3)
    assert read_header(after).tables_crc != read_header(before).tables_crc
    assert torch.equal(decompress_image(codec, after, MODEL), reconstruct_image(codec, image))


_DECODE_SCRIPT = """
import sys, torch
from zoo.codecs import decompress_image, load_codec
torch.set_num_threads(int(sys.argv[1]))
codec, _ = load_codec(sys.argv[2])
pixels = decompress_image(codec, open(sys.argv[3], 'rb').read(), sys.argv[4])
torch.save(pixels, sys.argv[5])
"""


def test_fresh_process_with_another_thread_count_decodes_the_same_pixels(tmp_path):
    codec = _codec()
    image = _image(200, 264)
    data = compress_image(codec, image, MODEL, 3)
    expected = decompress_image(codec, data, MODEL)
    save_codec(codec, tmp_path / 'codec.safetensors', 'compressai:bmshj2018-hyperprior', 3,
               {'kwargs': {'N': 16, 'M': 24}})
    (tmp_path / 'stream.bin').write_bytes(data)
    threads = 1 if torch.get_num_threads() > 1 else 2
    result = subprocess.run([sys.executable, '-c', _DECODE_SCRIPT, str(threads), str(tmp_path / 'codec.safetensors'),
                             str(tmp_path / 'stream.bin'), MODEL, str(tmp_path / 'pixels.pt')],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / 'pixels.pt', weights_only=True), expected)


@pytest.mark.parametrize('image, match', [
    (torch.rand(3, 8, 8), 'uint8'),
    (torch.zeros(4, 8, 8, dtype=torch.uint8), 'RGB'),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), 'RGB'),
    (torch.zeros(8, 8, dtype=torch.uint8), 'RGB'),
    (torch.zeros(3, 0, 8, dtype=torch.uint8), 'size'),
    (np.zeros((3, 8, 8), np.uint8), 'tensor'),
])
def test_non_rgb_images_are_clear_errors(codec, image, match):
    with pytest.raises(ValueError, match=match):
        compress_image(codec, image, MODEL, 3)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 100.4 / 255, 1.0, 2.0]).view(1, 1, -1).expand(3, 1, -1)
    assert to_uint8(x)[0, 0].tolist() == [0, 0, 0, 2, 100, 255, 255]


def _png_48bit(path, pixels: np.ndarray) -> None:
    """Write (H, W, 3) uint16 as a 16-bit-per-channel RGB PNG (Pillow cannot write these)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))
    height, width, _ = pixels.shape
    rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in pixels)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def test_load_rgb_strict_rejects_and_convert_converts(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / 'gray.png')
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    Image.new('CMYK', (4, 3), (0, 0, 0, 0)).save(tmp_path / 'cmyk.jpg')
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / 'gray16.png')
    deep = np.full((3, 4, 3), 0x1234, np.uint16)
    _png_48bit(tmp_path / 'rgb48.png', deep)
    for name, mode in [('gray.png', 'L'), ('rgba.png', 'RGBA'), ('cmyk.jpg', 'CMYK'), ('gray16.png', '16-bit'),
                       ('rgb48.png', '16-bit')]:
        with pytest.raises(ValueError, match=f'not an 8-bit RGB image.*{mode}'):
            load_rgb(tmp_path / name)
    assert torch.equal(load_rgb(tmp_path / 'gray.png', 'convert'), torch.from_numpy(gray).expand(3, -1, -1))
    converted = load_rgb(tmp_path / 'rgba.png', 'convert')
    assert converted[:, 0, 0].tolist() == [200, 0, 0] and converted[:, 2, 3].tolist() == [255, 255, 255]
    assert load_rgb(tmp_path / 'cmyk.jpg', 'convert').float().mean() > 250  # CMYK (0,0,0,0) is white
    assert torch.equal(load_rgb(tmp_path / 'gray16.png', 'convert'), torch.from_numpy(gray).expand(3, -1, -1))
    assert load_rgb(tmp_path / 'rgb48.png', 'convert').unique().tolist() == [0x12]
    rgb = (np.arange(36, dtype=np.uint8).reshape(3, 4, 3) * 7)
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    assert torch.equal(load_rgb(tmp_path / 'rgb.png'), torch.from_numpy(rgb).permute(2, 0, 1))
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(10))
    with pytest.raises(ValueError, match='cannot read image'):
        load_rgb(tmp_path / 'broken.png')
    with pytest.raises(ValueError, match='mode must be'):
        load_rgb(tmp_path / 'rgb.png', 'lenient')


def test_s2lic_tiny_decodes_exactly_its_eval_forward_reconstruction():
    from zoo.codecs import create_codec
    torch.manual_seed(0)
    codec = create_codec('s2lic_tiny')
    image = _image(45, 70)
    data = compress_image(codec, image, 's2lic_tiny', 3)
    assert torch.equal(decompress_image(codec, data, 's2lic_tiny'), reconstruct_image(codec, image))
