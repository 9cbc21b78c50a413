# TransNeXt-Tiny Mask R-CNN 1x (official: 49.9 box / 44.6 mask mAP, mmdet 2.28.2): AdamW 1e-4, wd 0.05,
# drop path 0.4, no decay on query embedding, local position bias, CPB, temperature and norms.
_base_ = ['./_mask_rcnn_fpn_1x_coco.py']

pretrained = None  # path of the official classification checkpoint (transnext_tiny_224_1k.pth)
model = dict(
    backbone=dict(_delete_=True, type='transnext_tiny', drop_path_rate=0.4, pretrained=pretrained),
    neck=dict(in_channels=[72, 144, 288, 576]))
