"""Encode/decode seconds per image of learned codecs against CompressAI's cheng2020-anchor and mbt2018, same run.

Every codec codes the same 512x512 photo (scikit-image's astronaut, cropped or resized to --img-size) through the
zoo's bitstream container (zoo.codecs.bitstream.compress_image / decompress_image: padding, the codec's compress /
decompress with the range coder, header and checksums), so the figures are what `zoo eval --task compression`
measures per image. Weights are random (no pretrained download; S2LIC has no official weights): timing does not
need trained weights, but the bitrates are meaningless and not reported as results. The baselines are the largest
CompressAI configs (cheng2020-anchor q6: N=192; mbt2018 q8: N=192, M=320, S2LIC's M), both autoregressive
(serial context model in the decoder). Medians of round-robin runs (benchmarks/na2d_cpu.py) per device: CPU, and
CUDA when available (the range coder runs on the CPU either way).

    PYTHONPATH=. .venv/bin/python benchmarks/compression_codecs.py --models s2lic_small s2lic_tiny --json /tmp/c.json
"""
import argparse
import datetime
import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from benchmarks.na2d_cpu import CLOCKS, cpu_model, interleaved_medians
from zoo.codecs import compress_image, create_codec, decompress_image

BASELINES = {'compressai:cheng2020-anchor': 6, 'compressai:mbt2018': 8}  # name -> quality (config size)


def photo(size: int) -> torch.Tensor:
    """(3, size, size) uint8: the astronaut photo (512x512), resized when another size is asked for."""
    image = Image.fromarray(skdata.astronaut())
    if size != image.width:
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def time_codec(name: str, quality: int, image: torch.Tensor, device: str, args) -> Dict[str, object]:
    """Median encode and decode seconds of one randomly initialised codec on one device."""
    torch.manual_seed(0)
    codec = create_codec(name, quality).to(device).eval()
    data = compress_image(codec, image, name, quality)  # also builds the CDF tables, outside the timing
    decoded = decompress_image(codec, data, name)
    if decoded.shape != image.shape:
        raise RuntimeError(f'{name} decoded {tuple(decoded.shape)} for a {tuple(image.shape)} image')
    timers = {'encode': (lambda: compress_image(codec, image, name, quality), args.warmup, args.repeats),
              'decode': (lambda: decompress_image(codec, data, name), args.warmup, args.repeats)}
    # no explicit CUDA synchronisation needed: both calls end on the host (bytes out, CPU pixels out)
    medians = interleaved_medians(timers, CLOCKS[args.clock])
    return {'model': name, 'quality': quality, 'device': device,
            'params_m': sum(p.numel() for p in codec.parameters()) / 1e6, 'bytes_random_init': len(data),
            'encode_s': medians['encode']['median_s'], 'decode_s': medians['decode']['median_s'],
            'encode_samples_s': medians['encode']['samples_s'], 'decode_samples_s': medians['decode']['samples_s']}


def ratios(rows: List[Dict[str, object]]) -> None:
    """Add encode/decode time ratios of every row against each baseline measured on the same device."""
    for row in rows:
        for baseline in BASELINES:
            reference = next(r for r in rows if r['model'] == baseline and r['device'] == row['device'])
            short = baseline.split(':')[1]
            row[f'encode_x_{short}'] = row['encode_s'] / reference['encode_s']
            row[f'decode_x_{short}'] = row['decode_s'] / reference['decode_s']


def format_table(rows: List[Dict[str, object]]) -> str:
    short = [b.split(':')[1] for b in BASELINES]
    header = ['model', 'q', 'device', 'params(M)', 'encode s', 'decode s'] + \
        [f'{kind} x {s}' for s in short for kind in ('enc', 'dec')]
    lines = [header]
    for r in rows:
        lines.append([r['model'], str(r['quality']), r['device'], f'{r["params_m"]:.1f}', f'{r["encode_s"]:.3f}',
                      f'{r["decode_s"]:.3f}'] + [f'{r[f"{kind}_x_{s}"]:.2f}' for s in short
                                                 for kind in ('encode', 'decode')])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return '\n'.join('  '.join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='*', default=['s2lic_small'],
                        help='codecs to time (zoo names or compressai:<name>); the baselines always run')
    parser.add_argument('--quality', type=int, default=3, help='quality label / CompressAI config of --models')
    parser.add_argument('--img-size', type=int, default=512)
    parser.add_argument('--devices', nargs='+', default=['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)),
                        help='torch.set_num_threads (default: all cores this process may use)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs per codec (after a first round trip)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per codec')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                        help="wall: time.perf_counter (default); cpu: process CPU time, for --threads 1 on a busy "
                             "shared machine (CPU devices only)")
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    args = parser.parse_args(argv)
    if args.clock == 'cpu' and 'cuda' in args.devices:
        parser.error('--clock cpu does not measure GPU time: use --devices cpu, or the wall clock')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    image = photo(args.img_size)
    codecs = [*BASELINES.items(), *((name, args.quality) for name in args.models)]
    rows = [time_codec(name, quality, image, device, args) for device in args.devices for name, quality in codecs]
    ratios(rows)
    print(f'{args.img_size}x{args.img_size}, random weights, {args.threads} threads, {args.clock} clock, {cpu_model()}'
          + (f', {torch.cuda.get_device_name()}' if 'cuda' in args.devices else ''))
    print(format_table(rows))
    if args.json:
        record = {'date': datetime.date.today().isoformat(), 'cpu': cpu_model(), 'threads': args.threads,
                  'clock': args.clock,
                  'torch': torch.__version__, 'img_size': args.img_size, 'command': ' '.join(sys.argv), 'rows': rows}
        with open(args.json, 'w') as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
