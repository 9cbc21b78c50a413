"""Detection task: FPN over any backbone, the three torchvision detectors, weight loading, COCO data and mAP."""
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import REPO, measured
from tiny_configs import tiny_kwargs
from zoo.data.coco import CocoInstances, detection_collate, shapes_coco
from zoo.data.shapes import ShapesConfig, render_sample
from zoo.tasks import load_recipe
from zoo.tasks import detection
from zoo.tasks.detection import (ARCHS, FeaturePyramidBackbone, HeadConfig, build_detector, coco_evaluate,
                                 evaluate, load_backbone_weights, validate_images)

FAMILIES = ['nat_mini', 'transnext_micro', 'overlock_xt', 'halonet_paper_h0']
SMALL_HEAD = dict(min_size=64, max_size=64, fpn_channels=16, rois_per_image=32)
QUICKSTART = REPO / 'recipes' / 'detection' / 'quickstart.yaml'


def _features(name):
    return timm.create_model(name, features_only=True, **tiny_kwargs(name))


@pytest.mark.parametrize('name,arch', [(name, 'mask_rcnn') for name in FAMILIES] + [('nat_mini', 'retinanet')])
def test_feature_pyramid_levels_have_the_detector_strides(name, arch):
    extra = 'maxpool' if arch == 'mask_rcnn' else 'p6p7'
    backbone = FeaturePyramidBackbone(_features(name), ARCHS[arch], 16, extra)
    levels = backbone(torch.randn(2, 3, 64, 64))
    # FPN levels at the requested strides, then the extra ones (each a stride-2 step, rounding up, on the last)
    sizes = [64 // s for s in ARCHS[arch]]
    for _ in range(1 if extra == 'maxpool' else 2):
        sizes.append(-(-sizes[-1] // 2))
    assert [tuple(v.shape) for v in levels.values()] == [(2, 16, s, s) for s in sizes]


def test_feature_pyramid_reads_the_backbone_features_unchanged():
    body = _features('nat_mini')
    backbone = FeaturePyramidBackbone(body, (8, 16, 32), 16, 'p6p7').eval()  # eval: no stochastic depth
    x = torch.randn(1, 3, 64, 64)
    expected = backbone.fpn(dict((str(i), f) for i, f in enumerate(body(x)[1:])))
    got = backbone(x)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_backbone_without_the_strides_is_a_clear_error():
    name = 'vit_small_patch16_224_mhsa'  # isotropic: one stride-16 feature map
    with pytest.raises(ValueError, match=r'strides \(4, 8, 16, 32\).*gives strides \[16, 16, 16\]'):
        build_detector(name, 3, SMALL_HEAD, tiny_kwargs(name))


@pytest.mark.parametrize('arch,name,losses', [
    ('mask_rcnn', 'nat_mini', {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}),
    ('retinanet', 'transnext_micro', {'classification', 'bbox_regression'}),
    ('fcos', 'halonet_paper_h0', {'classification', 'bbox_regression', 'bbox_ctrness'}),
])
def test_detectors_train_and_predict_over_zoo_backbones(arch, name, losses):
    torch.manual_seed(0)
    # FCOS's head uses GroupNorm(32, width): its FPN must be a multiple of 32 wide
    detector = build_detector(name, 3, dict(SMALL_HEAD, arch=arch, fpn_channels=32), tiny_kwargs(name))
    images, targets = [], []
    for index in range(2):  # two images: batch-norm backbones (HaloNet) need more than one value per channel
        sample = render_sample(ShapesConfig(num_samples=2, max_objects=2, num_classes=3), index)
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255)
        targets.append(dict(boxes=torch.from_numpy(sample.boxes), labels=torch.from_numpy(sample.labels) + 1,
                            masks=torch.from_numpy(sample.masks.astype(np.uint8))))
    detector.train()
    out = detector(images, targets)
    assert set(out) == losses and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    first = next(detector.backbone.body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    detector.eval()
    with torch.no_grad():
        pred = detector(images)[0]  # FCOS's GroupNorm needs > 1 value per group on its 1x1 P7: two images
    assert pred['boxes'].shape[1] == 4 and len(pred['boxes']) == len(pred['scores']) == len(pred['labels'])
    assert ((pred['labels'] >= 1) & (pred['labels'] <= 3)).all()
    assert (pred['boxes'] >= 0).all() and (pred['boxes'] <= 64).all()
    if arch == 'mask_rcnn':
        assert pred['masks'].shape[1:] == (1, 64, 64)


def _random_copy(name, seed):
    torch.manual_seed(seed)
    return timm.create_model(name, **tiny_kwargs(name))


def test_mmdet_checkpoint_backbone_entries_load(tmp_path):
    source = _random_copy('nat_mini', 1)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items() if not k.startswith('head.')}
    state.update({'backbone.norm0.weight': torch.ones(16), 'neck.lateral_convs.0.conv.weight': torch.zeros(1),
                  'rpn_head.rpn_cls.weight': torch.zeros(1)})
    torch.save({'meta': {'epoch': 12}, 'state_dict': state}, tmp_path / 'mask_rcnn.pth')
    body = _features('nat_mini')
    report = load_backbone_weights(body, str(tmp_path / 'mask_rcnn.pth'))
    # the downstream-only output norm and the classifier's final norm (pruned by features_only) have no place
    pruned = {k[len('backbone.'):] for k in state if k.startswith('backbone.')} - set(body.model.state_dict())
    assert set(report['unused']) == pruned and 'norm0.weight' in pruned
    x = torch.randn(1, 3, 64, 64)
    expected = source.eval().forward_intermediates(x, intermediates_only=True)
    got = body.eval()(x)
    assert all(torch.allclose(g, e) for g, e in zip(got, expected))


def test_classification_checkpoint_loads_and_head_is_unused(tmp_path):
    source = _random_copy('overlock_xt', 2)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / 'cls.safetensors'))
    body = _features('overlock_xt')
    report = load_backbone_weights(body, str(tmp_path / 'cls.safetensors'))
    own = body.model.state_dict()
    assert sorted(report['loaded']) == sorted(own)
    assert all(torch.equal(own[k], source.state_dict()[k]) for k in own)
    # head keys are left over (what the family's filter keeps of them), never a backbone key
    assert report['unused'] and set(report['unused']) <= set(source.state_dict()) - set(own)


def test_checkpoint_missing_backbone_weights_is_a_clear_error(tmp_path):
    state = dict(_random_copy('nat_mini', 3).state_dict())
    body = _features('nat_mini')
    dropped = next(iter(body.model.state_dict()))
    del state[dropped]
    torch.save(state, tmp_path / 'partial.pth')
    with pytest.raises(ValueError, match=f'missing.*{dropped}'):
        load_backbone_weights(body, str(tmp_path / 'partial.pth'))


@pytest.fixture(scope='module')
def shapes_val(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    return shapes_coco(str(root), 'val', 6, img_size=48, num_classes=4)


def test_coco_dataset_items_match_the_rendered_samples(shapes_val):
    dataset = CocoInstances(*shapes_val)
    assert len(dataset) == 6 and dataset.classes == ['circle', 'square', 'triangle', 'star']
    for index in range(len(dataset)):
        image, target = dataset[index]
        sample = render_sample(ShapesConfig(num_samples=6, img_size=48, num_classes=4, split='val', max_objects=3),
                               int(target['image_id']))
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert torch.equal((image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(sample.image))
        assert torch.equal(target['boxes'], torch.from_numpy(sample.boxes))
        assert torch.equal(target['labels'], torch.from_numpy(sample.labels) + 1)
        assert torch.equal(target['masks'].bool(), torch.from_numpy(sample.masks))


def test_horizontal_flip_moves_boxes_with_the_masks(shapes_val):
    torch.manual_seed(0)
    dataset = CocoInstances(*shapes_val, hflip=True)
    flipped = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        for box, mask in zip(target['boxes'], target['masks']):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        plain, _ = CocoInstances(*shapes_val)[index]
        flipped += int(torch.equal(image, plain.flip(-1)) and not torch.equal(image, plain))
    assert flipped > 0


def test_polygon_annotations_and_unreadable_images(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'broken.png').write_bytes(b'not a png')
    ann = {'images': [{'id': 7, 'file_name': 'broken.png', 'height': 20, 'width': 30}],
           'annotations': [{'id': 1, 'image_id': 7, 'category_id': 5, 'bbox': [2, 3, 10, 5], 'area': 50, 'iscrowd': 0,
                            'segmentation': [[2, 3, 12, 3, 12, 8, 2, 8]]}],
           'categories': [{'id': 5, 'name': 'thing'}]}
    (tmp_path / 'ann.json').write_text(json.dumps(ann))
    dataset = CocoInstances(str(tmp_path / 'ann.json'), str(tmp_path / 'images'))
    assert dataset.cat_to_label == {5: 1}
    boxes, labels, masks = dataset._annotations(7, 20, 30)
    assert boxes.tolist() == [[2, 3, 12, 8]] and labels.tolist() == [1]
    assert masks.shape == (1, 20, 30) and 40 <= masks.sum() <= 66  # the 10x5 rectangle, boundary pixels either way
    with pytest.raises(ValueError, match='cannot read image .*broken.png'):
        dataset[0]


def _ground_truth_predictions(dataset, shift=0.0):
    outputs, ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target['masks'].float()[:, None]
        outputs.append(dict(boxes=target['boxes'] + shift, labels=target['labels'],
                            scores=torch.linspace(0.9, 0.5, len(target['labels'])), masks=masks))
        ids.append(int(target['image_id']))
    return outputs, ids


def test_coco_map_is_100_for_ground_truth_and_drops_for_shifted_boxes(shapes_val):
    dataset = CocoInstances(*shapes_val)
    outputs, ids = _ground_truth_predictions(dataset)
    perfect = detection._metrics(dataset, outputs, ids)
    assert perfect['bbox_mAP'] == pytest.approx(100) and perfect['segm_mAP'] == pytest.approx(100)
    shifted = detection._metrics(dataset, _ground_truth_predictions(dataset, shift=6.0)[0], ids)
    assert shifted['bbox_mAP'] < 90 and shifted['segm_mAP'] == pytest.approx(100)
    assert coco_evaluate(dataset.coco, [], 'bbox', ids)['bbox_mAP'] == 0.0


@pytest.mark.parametrize('images,targets,message', [
    ([torch.rand(1, 32, 32)], None, r'image 0: expected a \(3, H, W\) tensor, got \(1, 32, 32\)'),
    ([torch.zeros(3, 32, 32, dtype=torch.uint8)], None, 'image 0: expected float values.*torch.uint8'),
    (torch.rand(2, 3, 32, 32), None, 'non-empty list'),
    ([torch.rand(3, 32, 32)], [dict(boxes=torch.zeros(2, 3), labels=torch.ones(2))], r'boxes must be \(N, 4\)'),
    ([torch.rand(3, 32, 32)], [dict(boxes=torch.zeros(2, 4), labels=torch.ones(1))], '2 boxes but 1 labels'),
])
def test_bad_inputs_are_clear_errors(images, targets, message):
    with pytest.raises(ValueError, match=message):
        validate_images(images, targets)


def test_backbone_rejects_wrong_channel_count():
    backbone = FeaturePyramidBackbone(_features('nat_mini'), (4, 8, 16, 32), 16)
    with pytest.raises(ValueError, match=r'expects \(B, 3, H, W\) images, got shape \(1, 4, 32, 32\)'):
        backbone(torch.rand(1, 4, 32, 32))


@pytest.mark.parametrize('head,message', [
    (dict(arch='yolo'), r'head.arch must be one of .*mask_rcnn'),
    (dict(anchors=3), r"unknown detection head key\(s\) \['anchors'\]"),
    (dict(min_size=[480, 'x']), 'head.min_size must be a positive int'),
    (dict(fpn_channels=0), 'head.fpn_channels must be a positive int'),
    (dict(arch='fcos', fpn_channels=48), 'fcos needs head.fpn_channels to be a multiple of 32.*got 48'),
])
def test_bad_head_settings_are_clear_errors(head, message):
    with pytest.raises(ValueError, match=message):
        HeadConfig(head)


def test_detection_recipes_have_valid_heads():
    paths = sorted((REPO / 'recipes' / 'detection').rglob('*.yaml'))
    assert len(paths) >= 10
    for path in paths:
        recipe = load_recipe(path, check_model=False)
        assert recipe.task == 'detection' and recipe.source, path
        HeadConfig(recipe.head)


def test_train_writes_a_detector_that_evaluate_checkpoint_reproduces(tmp_path):
    recipe = load_recipe(QUICKSTART, ['data.train_size=4', 'data.val_size=3', 'data.batch_size=2',
                                      'data.eval_batch_size=3', 'data.img_size=48', 'schedule.epochs=1',
                                      'schedule.warmup_epochs=0', 'head.fpn_channels=16', 'head.min_size=48',
                                      'head.max_size=48', 'model.depths=[1,1,1,1]', 'model.embed_dim=16',
                                      'logging.csv=false'])
    metrics = detection.train(recipe, str(tmp_path / 'run'))
    assert metrics['epochs'] == 1 and 0 <= metrics['bbox_mAP'] <= 100 and 'segm_mAP' in metrics
    run = tmp_path / 'run'
    for name in ('metrics.json', 'checkpoints/last.ckpt', 'model/model.safetensors', 'model/config.json'):
        assert (run / name).is_file(), name
    data = run / 'data' / 'shapes_val_n3_s48_c10_seed0_o1-3'
    evaluated = detection.evaluate_checkpoint(str(run / 'model'), str(data / 'instances_val.json'),
                                              str(data / 'images'), batch_size=3)
    assert evaluated['images'] == 3
    for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP'):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'eval', '--task', 'detection', '--checkpoint',
                             str(run / 'model'), '--ann-file', str(data / 'instances_val.json'), '--data',
                             str(data / 'images'), '--batch-size', '3', '--workers', '0',
                             '--json', str(tmp_path / 'eval.json')], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / 'eval.json').read_text())
    assert measured(written) == pytest.approx(measured(evaluated))
    assert written['device'] == 'cpu' and written['checkpoint'] == str(run / 'model')


@pytest.mark.heavy
def test_quickstart_learns_shapes_above_chance(tmp_path):
    recipe = load_recipe(QUICKSTART)
    metrics = detection.train(recipe, str(tmp_path / 'run'))
    assert metrics['bbox_mAP_50'] > 10, metrics  # measured 21.4 (chance ~ 0)


def test_evaluate_runs_a_built_detector(shapes_val):
    torch.manual_seed(0)
    detector = build_detector('halonet_paper_h0', 4, dict(SMALL_HEAD, arch='retinanet', min_size=48, max_size=48),
                              tiny_kwargs('halonet_paper_h0'))
    result = evaluate(detector, CocoInstances(*shapes_val), batch_size=3)
    assert result['images'] == 6 and 0 <= result['bbox_mAP'] <= 100 and 'segm_mAP' not in result
    images, targets = detection_collate([CocoInstances(*shapes_val)[0]])
    assert len(images) == 1 and isinstance(targets[0], dict)
