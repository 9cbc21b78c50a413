"""Segmentation task: smp UPerNet/FPN over zoo backbones (timm contract only), data, mIoU, recipes, training."""
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import REPO, measured
from tiny_configs import tiny_kwargs
from zoo.data.segmentation import MaskFolder, SegTransform, ShapesSegmentation, ade20k_folders
from zoo.data.shapes import ShapesConfig, export_segmentation, render_sample
from zoo.recipes import save_recipe
from zoo.tasks import load_recipe
from zoo.tasks import segmentation
from zoo.tasks.segmentation import build_segmenter, confusion_matrix, segmentation_metrics

QUICKSTART = REPO / 'recipes' / 'segmentation' / 'quickstart.yaml'
OFFICIAL = sorted(p for p in (REPO / 'recipes' / 'segmentation').rglob('upernet_*.yaml'))
TINY_RUN = ['data.train_size=48', 'data.val_size=20', 'data.batch_size=16', 'data.eval_batch_size=10',
            'data.img_size=32', 'schedule.epochs=1', 'schedule.warmup_epochs=0', 'head.decoder_channels=16']
BACKBONES = ['nat_mini', 'transnext_micro', 'moh_transnext_base_50', 'overlock_xt', 'halonet_paper_h0']


@pytest.mark.parametrize('name', BACKBONES)
def test_upernet_runs_on_the_backbones_own_features(name):
    """The smp encoder is the zoo model's features_only network: same weights give the same feature maps.

    The strict state-dict load also proves that constructor arguments smp's own encoder arguments shadow
    (OverLoCK's `depth`) reached the backbone."""
    torch.manual_seed(0)
    kwargs = tiny_kwargs(name)
    model = build_segmenter(name, 4, arch='upernet', model_kwargs=kwargs, decoder_channels=16)
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 4, 64, 64)
    logits.square().mean().backward()
    encoder = model.net.encoder.model
    reference = timm.create_model(name, features_only=True, **kwargs)
    reference.load_state_dict(encoder.state_dict())
    sum(f.mean() for f in reference(images)).backward()
    # the decoder uses every feature map: only what the backbone's features never use may lack a gradient
    unused = {n for n, p in encoder.named_parameters() if p.grad is None}
    assert unused == {n for n, p in reference.named_parameters() if p.grad is None}

    reference.load_state_dict(encoder.state_dict())  # both took one training step's BatchNorm statistics
    model.eval()
    reference.eval()
    with torch.no_grad():
        ours = model.net.encoder(images)[2:]  # smp prepends the input and an empty stride-2 map
        expected = reference(images)
    assert [f.shape[-1] for f in ours] == [16, 8, 4, 2]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_fpn_runs_on_a_non_square_input():
    model = build_segmenter('nat_mini', 3, arch='fpn', model_kwargs=tiny_kwargs('nat_mini'),
                            decoder_pyramid_channels=32, decoder_segmentation_channels=32)
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)


@pytest.mark.parametrize('images,message', [
    (torch.randn(2, 4, 64, 64), r'must be \(B, 3, H, W\), got shape \(2, 4, 64, 64\)'),
    (torch.randn(3, 64, 64), r'must be \(B, 3, H, W\)'),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), 'floating point tensor, got torch.uint8'),
    (torch.randn(2, 3, 60, 64), 'divisible by 32.*got 60x64'),
    (torch.randn(1, 3, 64, 64), 'batch of at least 2 images, got 1'),
])
def test_bad_input_is_one_clear_value_error(images, message):
    model = build_segmenter('halonet_paper_h0', 3, model_kwargs=tiny_kwargs('halonet_paper_h0'),
                            decoder_channels=16)
    with pytest.raises(ValueError, match=message):
        model(images)


@pytest.mark.parametrize('kwargs,message', [
    (dict(model_name='vit_tiny_patch16_224'), r'strides 4, 8, 16, 32.*got strides \[16, 16, 16\]'),
    (dict(model_name='nat_mini', arch='deeplab'), 'head.arch must be one of upernet, fpn'),
    (dict(model_name='nat_mini', decoder_chanels=8), r"unknown upernet head arguments \['decoder_chanels'\]"),
    (dict(model_name='nat_mini', model_kwargs=dict(output_stride=16)), r"\['output_stride'\] are set by the segmenter"),
    (dict(model_name='nat_gigantic'), "unknown model 'nat_gigantic'"),
])
def test_bad_configuration_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_segmenter(num_classes=3, **kwargs)


def test_confusion_matrix_and_miou_match_a_per_class_count():
    generator = torch.Generator().manual_seed(0)
    num_classes, ignore = 5, 255
    target = torch.randint(0, num_classes, (3, 17, 19), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = ignore
    target[target == 4] = 3  # class 4 never in the truth ...
    pred = torch.randint(0, num_classes - 1, target.shape, generator=generator)  # ... nor predicted: skipped
    confusion = confusion_matrix(pred, target, num_classes, ignore)
    valid = target != ignore
    ious, accs = [], []
    for c in range(num_classes):
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) | (target == c)) & valid).sum().item()
        if union:
            ious.append(inter / union)
        if ((target == c) & valid).sum():
            accs.append(inter / ((target == c) & valid).sum().item())
        for p in range(num_classes):
            assert confusion[c, p] == ((target == c) & (pred == p) & valid).sum()
    metrics = segmentation_metrics(confusion)
    assert metrics['mIoU'] == pytest.approx(100 * np.mean(ious))
    assert metrics['mAcc'] == pytest.approx(100 * np.mean(accs))
    assert metrics['aAcc'] == pytest.approx(100 * ((pred == target) & valid).sum().item() / valid.sum().item())


def test_confusion_matrix_rejects_out_of_range_labels_and_shape_mismatch():
    with pytest.raises(ValueError, match=r'target labels must be in \[0, 3\) or 255'):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3, 255)
    with pytest.raises(ValueError, match='shapes differ'):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 3, 255)


def test_mask_folder_reads_the_shapes_export_and_ade20k_labels(tmp_path):
    config = ShapesConfig(num_samples=3, img_size=32, max_objects=3, split='val')
    export_segmentation(config, tmp_path / 'shapes')
    folder = MaskFolder(tmp_path / 'shapes' / 'images', tmp_path / 'shapes' / 'masks')
    for index in range(3):
        image, mask = folder[index]
        sample = render_sample(config, index)
        assert torch.equal(mask, torch.from_numpy(sample.semantic.astype(np.int64)))
        assert torch.equal((image * 255).round().byte(), torch.from_numpy(sample.image).permute(2, 0, 1))

    images, annotations = ade20k_folders(tmp_path / 'ade', 'train')
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    labels = np.array([[0, 1, 150], [2, 0, 3]], dtype=np.uint8)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(images / 'ADE_train_1.jpg')
    Image.fromarray(labels).save(annotations / 'ADE_train_1.png')
    _, mask = MaskFolder(images, annotations, reduce_zero_label=True)[0]
    assert mask.tolist() == [[255, 0, 149], [1, 255, 2]]

    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(images / 'ADE_train_2.jpg')
    with pytest.raises(FileNotFoundError, match='1 images .* have no mask PNG.*ADE_train_2.jpg'):
        MaskFolder(images, annotations)


def test_transforms_crop_pad_and_keep_labels():
    image, mask = torch.rand(3, 40, 70), torch.randint(0, 4, (40, 70))
    train = SegTransform(64, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, ratio_range=(0.5, 2.0))
    for _ in range(5):
        out_image, out_mask = train(image, mask)
        assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 255}
    evaluation = SegTransform(48, mean=(0.5,) * 3, std=(0.25,) * 3, train=False)
    out_image, out_mask = evaluation(image, mask)
    assert out_image.shape == (3, 64, 96)  # short side 40 -> 48 (long 84), padded up to multiples of 32
    assert (out_mask[48:] == 255).all() and (out_mask[:, 84:] == 255).all() and (out_mask[:48, :84] != 255).all()
    assert out_image[:, 48:].abs().max() == 0  # padding is the mean colour: zero after normalising


def test_shapes_dataset_matches_the_renderer():
    data = ShapesSegmentation(4, img_size=32, split='val')
    _, mask = data[2]
    assert torch.equal(mask, torch.from_numpy(render_sample(data.config, 2).semantic.astype(np.int64)))


@pytest.mark.parametrize('path', OFFICIAL, ids=[p.name for p in OFFICIAL])
def test_official_recipes_use_known_head_arguments(path):
    recipe = load_recipe(path)
    head = dict(recipe.head)
    assert head.pop('arch') in segmentation.ARCHITECTURES
    assert set(head) <= set(segmentation.decoder_arguments(recipe.head['arch']))
    assert recipe.data.num_classes == 150 and recipe.data.name == 'ade20k'


@pytest.mark.heavy
@pytest.mark.parametrize('path', OFFICIAL, ids=[p.name for p in OFFICIAL])
def test_official_recipes_build_their_segmenter(path):
    """Every `head:` key and model argument of the 160k recipes is accepted (built on the meta device)."""
    recipe = load_recipe(path)
    head = dict(recipe.head)
    with torch.device('meta'):
        model = build_segmenter(recipe.model.name, recipe.data.num_classes, arch=head.pop('arch'),
                                model_kwargs=recipe.model.kwargs, **head)
    assert model.net.segmentation_head[0].out_channels == 150


def test_short_training_run_writes_metrics_and_evaluation_reproduces_them(tmp_path):
    recipe = load_recipe(QUICKSTART, TINY_RUN)
    metrics = segmentation.train(recipe, str(tmp_path / 'run'))
    run = tmp_path / 'run'
    assert json.loads((run / 'metrics.json').read_text()) == pytest.approx(metrics)
    assert metrics['num_classes'] == 11 and metrics['epochs'] == 1 and 0 <= metrics['val_mIoU'] <= 100
    for name in ('recipe.yaml', 'checkpoints/last.ckpt', 'checkpoints/best.ckpt', 'model/config.json',
                 'model/model.safetensors'):
        assert (run / name).is_file(), name
    # the model folder evaluates without the run's recipe; a Lightning checkpoint of the run with it
    (tmp_path / 'elsewhere').mkdir()
    moved = run.rename(tmp_path / 'elsewhere' / 'run') / 'model'
    again = segmentation.evaluate(str(moved))
    assert again['mIoU'] == pytest.approx(metrics['val_mIoU'], abs=1e-4) and again['images'] == 20
    from_ckpt = segmentation.evaluate(str(moved.parent / 'checkpoints' / 'last.ckpt'))
    assert measured(from_ckpt) == pytest.approx(measured(again))
    # the task is read from the folder's metadata: no --task
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'eval', '--checkpoint', str(moved), '--workers', '0',
                             '--json', str(tmp_path / 'e.json')], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert measured(json.loads((tmp_path / 'e.json').read_text())) == pytest.approx(measured(again))
    assert json.loads((moved / 'config.json').read_text())['zoo']['metrics'] == pytest.approx(metrics)


def test_folders_of_the_earlier_segmenter_pt_layout_still_evaluate(tmp_path):
    """Runs written before the artifact format saved RUN/model/segmenter.pt (a torch state dict) beside
    RUN/recipe.yaml; they evaluate as before, through the command too."""
    recipe = load_recipe(QUICKSTART, TINY_RUN)
    model = segmentation.SegmentationModule(recipe, 11).model
    run = tmp_path / 'old_run'
    (run / 'model').mkdir(parents=True)
    torch.save(model.state_dict(), run / 'model' / 'segmenter.pt')
    save_recipe(recipe, run / 'recipe.yaml')
    direct = segmentation.evaluate(str(run / 'model' / 'segmenter.pt'))
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'eval', '--checkpoint', str(run / 'model'),
                             '--workers', '0', '--json', str(tmp_path / 'e.json')], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert measured(json.loads((tmp_path / 'e.json').read_text())) == pytest.approx(measured(direct))
    assert direct['images'] == 20


def test_a_damaged_model_folder_is_one_clear_error(tmp_path):
    folder = tmp_path / 'model'
    folder.mkdir()
    (folder / 'config.json').write_text('{"recipe": ')
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'eval', '--task', 'segmentation', '--checkpoint',
                             str(folder)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and 'config.json is damaged: not valid JSON' in result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.heavy
def test_quickstart_learns_the_shapes_well_above_chance(tmp_path):
    """The full quickstart (minutes on a free CPU). Predicting background everywhere scores one IoU of roughly
    0.7 among 11 classes, mIoU ~ 6; measured runs reached 34.6 and 35.3."""
    metrics = segmentation.train(load_recipe(QUICKSTART), str(tmp_path / 'run'))
    assert metrics['val_mIoU'] > 25


def test_backbone_position_biases_get_no_weight_decay():
    """The optimizer exempts the backbone's no_weight_decay() parameters (NAT's rpb), as the official
    downstream configs do, besides timm's 1-d exemption; the other weights decay."""
    from zoo.tasks.engine import create_optimizer
    recipe = load_recipe(REPO / 'recipes/segmentation/quickstart.yaml')
    model = build_segmenter('nat_mini', 3, arch='fpn', model_kwargs=tiny_kwargs('nat_mini'))
    optimizer = create_optimizer(model, recipe, world_size=1)
    decay_of = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    named = dict(model.named_parameters())
    rpb = [name for name in named if name.endswith('rpb')]
    assert rpb and all(decay_of[id(named[name])] == 0 for name in rpb)
    assert recipe.optim.weight_decay > 0
    assert decay_of[id(named['net.encoder.model.model.levels.0.blocks.0.attn.qkv.weight'])] == recipe.optim.weight_decay
