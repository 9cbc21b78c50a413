"""Learned-codec machinery: codecs by name and codec files, the bitstream container, rate-distortion evaluation.

    factory     create_codec / save_codec / load_codec (zoo codecs through timm, CompressAI's as `compressai:<name>`)
    bitstream   the self-describing, checksummed container: compress_image / decompress_image
    metrics     PSNR / MS-SSIM / bpp on 8-bit RGB, one RD point of a learned codec (evaluate_codec)
    classic     Pillow's JPEG, WebP, AVIF, JPEG 2000 measured the same way
    bd_rate     Bjøntegaard delta rates
    report      the whole comparison (`zoo eval --task compression`): curves, BD-rates, JSON, plot

The CDF tables of every codec are kept current by zoo.layers.entropy_tables.
"""
from zoo.layers.compressai_import import quiet_compressai_import

with quiet_compressai_import():  # this package is built on CompressAI, which `import zoo` leaves out
    from .bitstream import BitstreamError, compress_image, decompress_image, read_header, reconstruct_image
    from .factory import COMPRESSAI_PREFIX, compressai_architecture, create_codec, load_codec, save_codec

__all__ = ['BitstreamError', 'compress_image', 'decompress_image', 'read_header', 'reconstruct_image',
           'COMPRESSAI_PREFIX', 'compressai_architecture', 'create_codec', 'load_codec', 'save_codec']
