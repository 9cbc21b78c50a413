# NAT-Tiny UPerNet (official: 47.1 / 48.4 ms mIoU, mmseg 0.20.2): AdamW 6e-5, wd 0.01, drop path 0.2.
_base_ = ['./_upernet_512x512_160k_ade20k.py']

pretrained = None  # path of the official classification checkpoint (nat_tiny.pth)
model = dict(
    backbone=dict(_delete_=True, type='NAT', embed_dim=64, mlp_ratio=3.0, depths=[3, 4, 18, 5],
                  num_heads=[2, 4, 8, 16], kernel_size=7, drop_path_rate=0.2, out_indices=(0, 1, 2, 3),
                  pretrained=pretrained),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
