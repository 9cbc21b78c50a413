"""Sparsifiner family (zoo/models/sparsifiner.py): tiny configs and parity fixture folders.

The connectivity predictor is fixed to 197 tokens, so tiny models keep 224x224 inputs at patch 16 and shrink
width and depth only; keep 0.25 keeps the sparse path (coefficient top-4 of the 197 // 6 = 32 basis tokens).
"""

_TINY = dict(embed_dim=32, depth=2, num_heads=2, attn_keep_rate=0.25, coef_topk=4)

# (glob on the model name, constructor overrides); the first matching pattern wins.
TINY = [
    ('sparsifiner_lvvit_*', dict(_TINY, mlp_ratio=3.)),
    ('sparsifiner_*', _TINY),
]

# Models that also run the expensive checks (torch.export).
REPRESENTATIVES = ['sparsifiner_deit_small', 'sparsifiner_lvvit_small']

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = {
    'blocks.*.attn.mask_predictor.*': 'the connectivity mask is detached (official): only the teacher-attention loss '
                                      'of phase 1 reaches the predictors, which are frozen unless attention '
                                      'reconstruction is on',
}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['sparsifiner']
