# DiNAT-Tiny Mask R-CNN 3x (official: 48.6 box / 43.5 mask mAP): NAT-Tiny with the COCO dilations.
_base_ = ['./_mask_rcnn_fpn_3x_coco.py']

pretrained = None  # path of the official classification checkpoint (dinat_tiny.pth)
model = dict(
    backbone=dict(_delete_=True, type='DiNAT', embed_dim=64, mlp_ratio=3.0, depths=[3, 4, 18, 5],
                  num_heads=[2, 4, 8, 16], kernel_size=7, drop_path_rate=0.2, out_indices=(0, 1, 2, 3),
                  dilations=[[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]],
                  pretrained=pretrained),
    neck=dict(in_channels=[64, 128, 256, 512]))
