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

# Checks this family cannot pass by design: {(model glob, check): reason}.
EXCEPTIONS = {
    ('sparsifiner_*', 'backward'): 'the connectivity mask is detached (official): the task loss gives the predictor '
                                   'no gradient; it is trained only by the teacher-attention loss (phase 1)',
    ('sparsifiner_*', 'features_backward'): 'as for backward: features give the detached connectivity predictor no '
                                            'gradient (it learns from the teacher-attention loss only)',
}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['sparsifiner']
