# NAT-Tiny Mask R-CNN 3x (official: 47.7 box / 42.6 mask mAP, mmdet 2.19): AdamW 1e-4, wd 0.05, drop path 0.2.
_base_ = ['./_mask_rcnn_fpn_3x_coco.py']

pretrained = None  # path of the official classification checkpoint (nat_tiny.pth)
model = dict(
    backbone=dict(_delete_=True, type='NAT', embed_dim=64, mlp_ratio=3.0, depths=[3, 4, 18, 5],
                  num_heads=[2, 4, 8, 16], kernel_size=7, drop_path_rate=0.2, out_indices=(0, 1, 2, 3),
                  pretrained=pretrained),
    neck=dict(in_channels=[64, 128, 256, 512]))
