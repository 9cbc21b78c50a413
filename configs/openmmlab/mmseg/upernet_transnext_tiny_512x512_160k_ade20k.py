# TransNeXt-Tiny UPerNet (official: 51.1 mIoU single scale, mmseg 0.30.0): AdamW 6e-5, wd 0.05, drop path 0.4.
_base_ = ['./_upernet_512x512_160k_ade20k.py']

pretrained = None  # path of the official classification checkpoint (transnext_tiny_224_1k.pth)
model = dict(
    backbone=dict(_delete_=True, type='transnext_tiny', drop_path_rate=0.4, pretrained=pretrained),
    decode_head=dict(in_channels=[72, 144, 288, 576]),
    auxiliary_head=dict(in_channels=288))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05))
