# OverLoCK-T Mask R-CNN 3x (official: 49.6 box / 43.9 mask mAP): AdamW 1e-4, multi-scale + crop training.
_base_ = ['./_mask_rcnn_fpn_3x_coco.py']

pretrained = None  # path of the official classification checkpoint (overlock_t_in1k_224.pth)
model = dict(
    backbone=dict(_delete_=True, type='overlock_t', context_proj=True, drop_path_rate=0.2, pretrained=pretrained),
    neck=dict(in_channels=[64, 128, 384, 640]))
optim_wrapper = dict(optimizer=dict(lr=0.0001), paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
