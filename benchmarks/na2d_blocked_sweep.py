"""Sweep of the blocked na2d path's two sizes, query tile T and chunk budget (CHUNK_LOGITS), on CPU (not a test).

Every (T, chunk) pair runs the fused operator on the NAT/DiNAT-mini layer shapes at 224 x 224, forward (no_grad)
and forward + backward, all pairs interleaved round-robin in one process; min of the repeats, ratio to the
current defaults (T = zoo.layers.kernels.na2d_blocked.default_tile of the axis, shown as "T=auto", and
CHUNK_LOGITS). Outputs are checked against the reference once per shape first.

    python benchmarks/na2d_blocked_sweep.py --batch 32 --tiles 4 6 8 --chunks 18 20 22
"""
import argparse
import contextlib
import itertools

import torch

from interleaved import best_seconds
from zoo.layers import neighborhood_attention_2d
from zoo.layers.kernels import na2d_blocked

# (name, heads, map size, dilation) of nat_mini / dinat_mini at 224 x 224 that take the blocked path (k 7)
SHAPES = [('56x56 h2 d1', 2, 56, 1), ('28x28 h4 d1', 4, 28, 1), ('28x28 h4 d4', 4, 28, 4)]


def _inputs(batch, heads, size):
    qkv = torch.randn(batch, size, size, 3, heads, 32, requires_grad=True)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # the NeighborhoodAttention2d layout
    return qkv, (q, k, v), torch.randn(heads, 13, 13, requires_grad=True)


def _runner(tensors, rpb, dilation, tile, chunk, backward):
    q, k, v = tensors

    def run():
        na2d_blocked.CHUNK_LOGITS = chunk
        if backward:
            na2d_blocked.neighborhood_attention_2d(q, k, v, 7, dilation, rpb, 0.2, tile=tile).sum().backward()
        else:
            with torch.no_grad():
                na2d_blocked.neighborhood_attention_2d(q, k, v, 7, dilation, rpb, 0.2, tile=tile)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--tiles', type=int, nargs='+', default=[4, 6, 8])
    parser.add_argument('--chunks', type=int, nargs='+', default=[18, 20, 22], help='log2 of CHUNK_LOGITS')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    default = (None, na2d_blocked.CHUNK_LOGITS)
    torch.manual_seed(0)
    print(f'batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, min of {args.repeats} '
          f'interleaved repeats; x default = time / time at T=auto, chunk 2^{default[1].bit_length() - 1}')
    for name, heads, size, dilation in SHAPES:
        qkv, tensors, rpb = _inputs(args.batch, heads, size)
        with torch.no_grad():
            expected = neighborhood_attention_2d(*tensors, 7, dilation, rpb, 0.2, backend='torch')
            got = na2d_blocked.neighborhood_attention_2d(*tensors, 7, dilation, rpb, 0.2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        pairs = list(itertools.product([None] + sorted(set(args.tiles)),
                                       sorted({1 << c for c in args.chunks} | {default[1]})))
        arms = {(tile, chunk, backward): (_runner(tensors, rpb, dilation, tile, chunk, backward),
                                          contextlib.nullcontext)
                for tile, chunk in pairs for backward in (False, True)}
        best = best_seconds(arms, args.repeats)
        na2d_blocked.CHUNK_LOGITS = default[1]
        for tile, chunk in pairs:
            cells = []
            for backward in (False, True):
                seconds = best[(tile, chunk, backward)]
                cells.append(f'{seconds * 1e3:8.1f} ms x{seconds / best[(*default, backward)]:.2f}')
            print(f'{name:<13} T={tile or "auto":<4} chunk 2^{chunk.bit_length() - 1:<3} fwd {cells[0]}   '
                  f'fwd+bwd {cells[1]}')


if __name__ == '__main__':
    main()
