"""HaloNet paper family (zoo/models/halonet.py): tiny configs; its operator fixtures run in tests/test_halo.py."""

# Block 2 so that the contract's 64x64 inputs tile (H must be a multiple of 32 * block_size); rv / rb / df stay
# the registered model's, so H5-H7 keep their widened values and final conv.
_TINY = dict(block_size=2, halo_size=1, widths=(8, 16, 16, 32), num_heads=(1, 2, 2, 2), depths=(1, 1, 2, 1),
             stem_chs=8)

TINY = [('halonet_paper_*', _TINY)]

REPRESENTATIVES = ['halonet_paper_h5']

NO_GRADIENT = {}

# The halo fixtures are operator cases (zoo.layers.HaloAttention), not model cases: tests/test_halo.py runs them.
PARITY_FOLDERS = []
