# DiNAT-Tiny UPerNet (official: 47.8 / 48.8 ms mIoU): NAT-Tiny with the ADE20K 512 dilations.
_base_ = ['./_upernet_512x512_160k_ade20k.py']

pretrained = None  # path of the official classification checkpoint (dinat_tiny.pth)
model = dict(
    backbone=dict(_delete_=True, type='DiNAT', embed_dim=64, mlp_ratio=3.0, depths=[3, 4, 18, 5],
                  num_heads=[2, 4, 8, 16], kernel_size=7, drop_path_rate=0.2, out_indices=(0, 1, 2, 3),
                  dilations=[[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]],
                  pretrained=pretrained),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
