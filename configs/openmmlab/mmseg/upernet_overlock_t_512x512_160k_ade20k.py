# OverLoCK-T UPerNet (official: 50.3 mIoU, mmseg 0.30.0): AdamW 6e-5, wd 0.01, drop path 0.2; fp32 (the
# official config leaves fp16 commented out: "may meet nan").
_base_ = ['./_upernet_512x512_160k_ade20k.py']

pretrained = None  # path of the official classification checkpoint (overlock_t_in1k_224.pth)
model = dict(
    backbone=dict(_delete_=True, type='overlock_t', drop_path_rate=0.2, pretrained=pretrained),
    decode_head=dict(in_channels=[64, 128, 384, 640]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
