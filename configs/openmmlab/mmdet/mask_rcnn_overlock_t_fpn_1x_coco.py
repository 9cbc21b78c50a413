# OverLoCK-T Mask R-CNN 1x (official: 48.3 box / 43.3 mask mAP, mmdet 2.28.2): AdamW 2e-4, wd 0.05 (no decay
# on norms), drop path 0.2; the detection backbone adds the projected context to its last output.
_base_ = ['./_mask_rcnn_fpn_1x_coco.py']

pretrained = None  # path of the official classification checkpoint (overlock_t_in1k_224.pth)
model = dict(
    backbone=dict(_delete_=True, type='overlock_t', context_proj=True, drop_path_rate=0.2, pretrained=pretrained),
    neck=dict(in_channels=[64, 128, 384, 640]))
optim_wrapper = dict(optimizer=dict(lr=0.0002), paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
