"""MoH-ViT (mixture-of-heads TransNeXt, registered in zoo/models/transnext.py): tiny configs and parity folders.

The models live in the TransNeXt family module, so tests/family_facts/transnext.py adds these entries to its own.
"""

# Every gating form in four narrow stages: all heads shared (k = 0, S = h = 2), one shared head with the top-1 of one
# routed head (no wg_1), one shared head with the top-1 of two, and no shared head with the top-2 of four (no wg_0).
TINY = [
    ('moh_transnext_*', dict(embed_dims=(24, 48, 72, 96), num_heads=(2, 2, 3, 4), depths=(1, 1, 1, 1),
                             shared_head=(2, 1, 1, 0), routed_head=(0, 1, 1, 2))),
]

# Models that also run the expensive checks (torch.export).
REPRESENTATIVES = ['moh_transnext_base_50']

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = {}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['moh']
