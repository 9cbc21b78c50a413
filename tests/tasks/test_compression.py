"""zoo.tasks.compression and zoo.data.photos: codec factory, codec files, RD loss, training from a recipe (run
folder, held-out real-bitstream metrics, resume, quality lists) and recipe validation."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO
from zoo.codecs import create_codec, load_codec, save_codec
from zoo.codecs.bitstream import compress_image, decompress_image, read_header, to_uint8
from zoo.data.images import image_files, load_rgb
from zoo.data.photos import PHOTOS, RandomCropDataset, export_photos, load_photo, photo_names
from zoo.recipes import RecipeError
from zoo.tasks import compression, load_recipe
from zoo.tasks.compression import LAMBDAS, held_out_point, rate_distortion_loss

QUICKSTART = REPO / 'recipes' / 'compression' / 'quickstart.yaml'
TINY_CODEC = ['model.name=compressai:bmshj2018-hyperprior', 'model.N=8', 'model.M=12']


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, (height, width) in enumerate(sizes):
        smooth = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        noisy = np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f'img{i}.png')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('lic')
    _write_images(root / 'train', [(80, 96), (70, 64)])
    _write_images(root / 'test', [(45, 70), (64, 64)], seed=1)
    return root


def _recipe(data_root, *overrides):
    tiny_run = [f'data.root={data_root}', 'data.name=folder', 'data.img_size=64', 'data.batch_size=4',
                'data.train_size=8', 'schedule.epochs=1', 'trainer.val_every=1', *TINY_CODEC]
    return load_recipe(QUICKSTART, [*tiny_run, *overrides])


def _train(data_root, out, *overrides, resume=None):
    return compression.train(_recipe(data_root, *overrides), str(out), resume=resume)


def test_create_codec_builds_compressai_architectures_at_a_quality():
    codec = create_codec('compressai:bmshj2018-hyperprior', quality=1)
    assert type(codec).__name__ == 'ScaleHyperprior' and codec.g_a[0].out_channels == 128
    assert create_codec('compressai:bmshj2018-hyperprior', 1, N=8, M=12).g_a[-1].out_channels == 12
    with pytest.raises(ValueError, match='needs a quality in'):
        create_codec('compressai:bmshj2018-hyperprior')
    with pytest.raises(ValueError, match='unknown CompressAI model'):
        create_codec('compressai:bmshj2018-hyperpior', 1)
    with pytest.raises(ValueError, match="unknown arguments \\['channels'\\]"):
        create_codec('compressai:bmshj2018-hyperprior', 1, channels=3)
    with pytest.raises(ValueError, match='unknown codec'):
        create_codec('no_such_codec')
    with pytest.raises(ValueError, match='not an image codec'):
        create_codec('resnet18')


def test_save_and_load_codec_round_trip(tmp_path):
    codec = create_codec('compressai:bmshj2018-hyperprior', 2, N=8, M=12)
    path = save_codec(codec, tmp_path / 'c.safetensors', 'compressai:bmshj2018-hyperprior', 2,
                      {'kwargs': {'N': 8, 'M': 12}, 'lmbda': 0.0035, 'metric': 'mse'})
    loaded, meta = load_codec(path)
    assert (meta['model'], meta['quality'], meta['lmbda'], meta['metric']) == \
        ('compressai:bmshj2018-hyperprior', 2, 0.0035, 'mse')
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in codec.state_dict().items())
    image = to_uint8(torch.rand(3, 40, 50))
    data = compress_image(codec, image, 'm', 2)
    assert compress_image(loaded, image, 'm', 2) == data
    assert torch.equal(decompress_image(loaded, data, 'm'), decompress_image(codec, data, 'm'))


def test_load_codec_refuses_foreign_truncated_and_mismatched_files(tmp_path):
    codec = create_codec('compressai:bmshj2018-hyperprior', 2, N=8, M=12)
    good = save_codec(codec, tmp_path / 'c.safetensors', 'compressai:bmshj2018-hyperprior', 2,
                      {'kwargs': {'N': 8, 'M': 12}})
    (tmp_path / 'cut.safetensors').write_bytes(good.read_bytes()[:-100])
    (tmp_path / 'junk.safetensors').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(64))
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
    save_codec(codec, tmp_path / 'wrong.safetensors', 'compressai:bmshj2018-hyperprior', 2,
               {'kwargs': {'N': 8, 'M': 16}})
    for name, match in [('missing.safetensors', 'not found'), ('cut.safetensors', 'truncated or corrupt'),
                        ('junk.safetensors', 'truncated or corrupt'), ('plain.safetensors', 'not a zoo codec'),
                        ('wrong.safetensors', 'do not fit')]:
        with pytest.raises(ValueError, match=match):
            load_codec(tmp_path / name)


def test_rate_distortion_loss_follows_compressai_convention():
    target = torch.full((1, 3, 16, 16), 0.5)
    out = {'x_hat': target + 0.1, 'likelihoods': {'y': torch.full((1, 2, 4, 4), 0.5), 'z': torch.ones(1, 2, 1, 1)}}
    terms = rate_distortion_loss(out, target, 0.01, 'mse')
    assert terms['bpp'].item() == pytest.approx(32 / 256)
    assert terms['loss'].item() == pytest.approx(0.01 * 255 ** 2 * 0.01 + 32 / 256, rel=1e-5)
    big = torch.rand(1, 3, 176, 176)
    ms_terms = rate_distortion_loss({'x_hat': big, 'likelihoods': out['likelihoods']}, big, 8.73, 'ms-ssim')
    assert ms_terms['loss'].item() == pytest.approx(32 / (176 * 176), abs=1e-5)  # identical images: 1 - MS-SSIM = 0
    with pytest.raises(ValueError, match='MS-SSIM needs images of at least 161'):
        rate_distortion_loss(out, target, 8.73, 'ms-ssim')


def test_photos_split_is_fixed_disjoint_and_exportable(tmp_path):
    train, test = photo_names('train'), photo_names('test')
    assert test == ['astronaut', 'coffee', 'chelsea'] and not set(train) & set(test)
    assert set(train) | set(test) == set(PHOTOS) and {'motorcycle_left', 'motorcycle_right'} <= set(train)
    paths = export_photos('test', tmp_path)
    assert [p.name for p in paths] == ['astronaut.png', 'coffee.png', 'chelsea.png']
    for name, path in zip(test, paths):
        assert torch.equal(load_rgb(path), load_photo(name)) and min(load_photo(name).shape[1:]) > 160
    assert all(load_photo(name).shape[0] == 3 for name in train)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        photo_names('val')


def test_random_crops_cover_small_images_and_flip(tmp_path):
    _write_images(tmp_path / 'imgs', [(20, 30)])
    files = image_files(tmp_path / 'imgs')
    dataset = RandomCropDataset(files, crop_size=32, length=40)
    random.seed(0)
    crops = [dataset[i] for i in range(len(dataset))]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.float32 for c in crops)
    image = load_rgb(files[0]).float() / 255
    padded = torch.nn.functional.pad(image[None], (0, 2, 0, 12), mode='reflect')[0]
    variants = [padded, padded.flip(2), padded.flip(1), padded.flip(1).flip(2)]
    seen = {next(i for i, v in enumerate(variants) if torch.equal(c, v)) for c in crops}
    assert seen == {0, 1, 2, 3}
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images'):
        image_files(tmp_path / 'empty')


def test_train_writes_codec_and_held_out_metrics_from_real_bitstreams(data_root, tmp_path):
    metrics = _train(data_root, tmp_path / 'run')
    run = tmp_path / 'run'
    for name in ('recipe.yaml', 'checkpoints/last.ckpt', 'checkpoints/best.ckpt', 'metrics.json',
                 'model/codec_q3.safetensors'):
        assert (run / name).is_file(), name
    assert json.loads((run / 'metrics.json').read_text()) == json.loads(json.dumps(metrics))
    assert metrics['lmbda'] == LAMBDAS['mse'][3] and metrics['steps'] == 2 and metrics['test_images'] == 2
    assert all(math.isfinite(metrics[k]) for k in ('train_loss', 'train_bpp', 'train_psnr', 'train_aux_loss'))
    codec, meta = load_codec(run / 'model' / 'codec_q3.safetensors')
    assert meta['kwargs'] == {'N': 8, 'M': 12} and meta['lmbda'] == LAMBDAS['mse'][3]
    test_files = image_files(data_root / 'test')
    again = held_out_point(codec, test_files, 'compressai:bmshj2018-hyperprior', 3)
    assert again['bpp'] == pytest.approx(metrics['test_bpp']) and again['psnr'] == pytest.approx(metrics['test_psnr'])
    image = load_rgb(test_files[0])
    data = compress_image(codec, image, 'compressai:bmshj2018-hyperprior', 3)
    assert 8 * len(data) / image[0].numel() > 0 and read_header(data).quality == 3
    assert again['ms_ssim'] is None  # the test images are smaller than MS-SSIM's 161 px minimum
    state = torch.load(run / 'checkpoints' / 'last.ckpt', weights_only=True)
    main_state, aux_state = state['optimizer_states']
    assert len(aux_state['state']) == 1  # only the EntropyBottleneck quantiles
    assert len(main_state['state']) == len(list(codec.parameters())) - 1


def test_resume_continues_both_optimizers(data_root, tmp_path):
    _train(data_root, tmp_path)
    first = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=True)
    metrics = _train(data_root, tmp_path, 'schedule.epochs=2', resume='last')
    second = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=True)
    assert metrics['epochs'] == 2 and second['global_step'] == 2 * first['global_step'] == 4
    assert second['optimizer_states'][1]['state'][0]['step'] == 2 * first['optimizer_states'][1]['state'][0]['step']
    with pytest.raises(FileNotFoundError, match='no checkpoint to resume from'):
        _train(data_root, tmp_path / 'fresh', resume='last')


def test_quality_list_trains_one_codec_per_quality(data_root, tmp_path):
    metrics = _train(data_root, tmp_path, 'model.quality=[1, 2]')
    assert metrics['qualities'] == [1, 2]
    assert [run['lmbda'] for run in metrics['runs']] == [LAMBDAS['mse'][1], LAMBDAS['mse'][2]]
    for quality in (1, 2):
        _, meta = load_codec(tmp_path / f'q{quality}' / 'model' / f'codec_q{quality}.safetensors')
        assert meta['quality'] == quality
    with pytest.raises(ValueError, match='loss.lmbda is one value'):
        _train(data_root, tmp_path / 'x', 'model.quality=[1, 2]', 'loss.lmbda=0.01')


def test_fine_tune_from_a_codec_checkpoint(data_root, tmp_path):
    start = create_codec('compressai:bmshj2018-hyperprior', 3, N=8, M=12)
    save_codec(start, tmp_path / 'start.safetensors', 'compressai:bmshj2018-hyperprior', 3,
               {'kwargs': {'N': 8, 'M': 12}})
    module = compression.CompressionModule(_recipe(data_root, f'model.checkpoint={tmp_path / "start.safetensors"}'),
                                           3, 0.01)
    assert all(torch.equal(v, module.codec.state_dict()[k]) for k, v in start.state_dict().items())
    with pytest.raises(ValueError, match='does not fit'):
        compression.CompressionModule(_recipe(data_root, f'model.checkpoint={tmp_path / "start.safetensors"}',
                                              'model.M=16'), 3, 0.01)


@pytest.mark.parametrize('overrides, error, match', [
    (['loss.metrik=mse'], RecipeError, 'unknown key `loss.metrik`'),
    (['loss.metric=psnr'], RecipeError, '`loss.metric` must be one of mse, ms-ssim'),
    (['model.NN=3'], RecipeError, 'unknown key `model.NN`.*allowed: .*M, N'),
    (['trainer.accumulate=2'], RecipeError, '`trainer.accumulate` must be 1'),
    (['trainer.precision=bf16-mixed'], RecipeError, 'fp32'),
    (['model.quality=300'], RecipeError, 'model.quality'),
    (['optim.aux_lr=0'], RecipeError, 'aux_lr'),
])
def test_recipe_errors_are_clear(data_root, overrides, error, match):
    with pytest.raises(error, match=match):
        _recipe(data_root, *overrides)


@pytest.mark.parametrize('overrides, match', [
    (['data.img_size=48'], 'multiple of .* pad_multiple 64'),
    (['loss.metric=ms-ssim', 'model.quality=7'], 'no default lambda for ms-ssim quality 7'),
    (['loss.metric=ms-ssim'], 'ms-ssim needs training crops of at least 161'),
    (['data.name=photoz'], "data.name must be one of photos, folder for compression, got 'photoz'"),
    (['model.quality=null'], 'model.quality is required'),
])
def test_training_setup_errors_are_clear(data_root, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _train(data_root, tmp_path, *overrides)


def test_quality_is_only_for_compression_recipes():
    with pytest.raises(RecipeError, match='only for compression recipes'):
        load_recipe(REPO / 'recipes' / 'classification' / 'quickstart.yaml', ['model.quality=3'])
