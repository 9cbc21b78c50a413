"""Key-driven GQA ViT family (zoo/models/kdgqa.py): tiny configs and parity fixture folders."""

# Every scheme keeps its structure: 4 query heads over 2 K/V heads (mhsa ignores num_kv_heads), 3 blocks.
TINY = [
    ('vit_*_patch16_224_*', dict(embed_dim=32, depth=3, num_heads=4, num_kv_heads=2)),
]

# Models that also run the expensive checks (torch.export): a static and a key-driven scheme.
REPRESENTATIVES = ['vit_small_patch16_224_gqa', 'vit_small_patch16_224_kdgqa']

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = {}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['kdgqa']
