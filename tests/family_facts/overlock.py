"""OverLoCK family (zoo/models/overlock.py): tiny configs and parity fixture folders."""

# Official kernels (17, 15, 13, 7) so the tiny models keep every structural path: at 224 the Focus-Net runs
# un-resized at 14x14 (k 13) and 7x7 (k 7); two stride-16 ContMix blocks exercise the context re-injection.
TINY = [
    ('overlock_*', dict(depth=(1, 1, 1, 1), sub_depth=(2, 1), embed_dim=(16, 32, 48, 64), sub_num_heads=(2, 2),
                        projection=64)),
]

# Models that also run the expensive checks (torch.export).
REPRESENTATIVES = ['overlock_xt']

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = {
    'aux_head.*': 'the auxiliary head serves only forward_with_aux (official loss main + 0.4 * aux): it is built so '
                  'official checkpoints load, and frozen until set_aux_head_trainable(True)',
}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['overlock']
