"""Learned image compression: rate–distortion training of a codec from a recipe (codecs, codec files, bitstreams
and the rate–distortion evaluation are zoo.codecs).

Training (`zoo train` of a `task: compression` recipe) follows CompressAI's examples/train.py convention:
    loss = lambda * 255^2 * MSE + bpp        (loss.metric: mse)
    loss = lambda * (1 - MS-SSIM) + bpp      (loss.metric: ms-ssim)
with bpp the likelihood estimate, an Adam-type main optimizer (the recipe's `optim`, timm) on every parameter except
the EntropyBottleneck `quantiles`, and a separate Adam on the quantiles (`optim.aux_lr`) driven by `aux_loss()`,
stepped after every main step; gradients of the main loss are clipped to `trainer.clip_grad` (CompressAI uses 1.0).
Lambda defaults to the quality's value in `LAMBDAS`. Data: `data.name: photos` (the bundled scikit-image photos,
zoo.data.photos: train split for training, held-out test split for evaluation) or `folder` (`data.root/train` and
`data.root/test`, CompressAI's ImageFolder layout); random `data.img_size` crops with flips, `data.train_size` crops
per epoch.

A recipe trains one quality (`model.quality: 3`, or `--set model.quality=3 loss.lmbda=...`); a list
(`model.quality: [1, 3, 5]`) trains each in turn into OUTPUT/q<quality>/. Run folder (zoo.tasks.engine) plus
    OUTPUT/model/codec_q<quality>.safetensors   the trained codec (zoo.codecs.save_codec / load_codec), beside the
                                                config.json of the task artifact (zoo.tasks.artifact)
    OUTPUT/metrics.json   train loss/bpp/PSNR (last epoch means) and the held-out evaluation: bpp from the real
                          bitstream bytes (zoo.codecs.bitstream, header included), PSNR / MS-SSIM on 8-bit RGB,
                          and the likelihood-estimated bpp for comparison
Per-epoch validation runs the eval-mode forward on the held-out images (estimated bpp) and logs `val_loss`, the RD
loss; `best.ckpt` keeps the epoch where it is lowest.
"""
import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from torch.utils.data import Dataset

from zoo.codecs.bitstream import padded_input, to_uint8
from zoo.codecs.factory import COMPRESSAI_PREFIX, compressai_architecture, create_codec, load_codec, save_codec
from zoo.codecs.metrics import MS_SSIM_MIN_SIDE, estimated_bpp, evaluate_codec, psnr_uint8
from zoo.data.images import image_files, load_rgb
from zoo.data.photos import RandomCropDataset, photo_names, photo_path
from zoo.recipes import Recipe, RecipeError, timm_constructor_arguments
from zoo.tasks.engine import Monitor, RunData, TaskModule, fit, start_run, write_metrics
from zoo.tasks.protocol import Task, data_root

__all__ = ['LAMBDAS', 'METRICS', 'resolve_lambda', 'rate_distortion_loss', 'CompressionModule', 'train', 'TASK']

# the codec files of a model folder (one per quality)
CODEC_FILE_PATTERN = 'codec_q*.safetensors'
# distortion terms of the RD loss (loss.metric)
METRICS = ('mse', 'ms-ssim')
# lambda per quality index in the L = lambda*255^2*MSE + bpp / lambda*(1-MS-SSIM) + bpp convention.
# MSE q1-q8: CompressAI's zoo models (q1-q6 shared with MLIC/MLIC++); MS-SSIM q1-q6: MLIC/MLIC++.
# Source: docs/compression.md §4 (the codec papers this zoo follows do not publish theirs).
LAMBDAS = {
    'mse': {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.18},
    'ms-ssim': {1: 2.4, 2: 4.58, 3: 8.73, 4: 16.64, 5: 31.73, 6: 60.5},
}
# ---------------------------------------------------------------------------------------------------------------
# losses and metrics

def resolve_lambda(recipe: Recipe, quality: int) -> float:
    """`loss.lmbda` when set, else the quality's lambda for `loss.metric` in LAMBDAS."""
    if recipe.loss.lmbda is not None:
        return float(recipe.loss.lmbda)
    table = LAMBDAS[recipe.loss.metric]
    if quality not in table:
        raise ValueError(f'no default lambda for {recipe.loss.metric} quality {quality} (known: {sorted(table)}); '
                         f'set loss.lmbda')
    return table[quality]


def rate_distortion_loss(out: Dict, target: torch.Tensor, lmbda: float, metric: str) -> Dict[str, torch.Tensor]:
    """CompressAI's RD loss for `out = codec(target)`, target (B, 3, H, W) in [0, 1].

    Returns scalars: loss (lambda*255^2*MSE + bpp, or lambda*(1-MS-SSIM) + bpp), bpp, mse.
    """
    batch, _, height, width = target.shape
    bpp = estimated_bpp(out['likelihoods'], batch * height * width)
    mse = F.mse_loss(out['x_hat'], target)
    if metric == 'mse':
        distortion = lmbda * 255 ** 2 * mse
    elif min(height, width) < MS_SSIM_MIN_SIDE:
        raise ValueError(f'MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px per side, got {height}x{width}')
    else:
        distortion = lmbda * (1 - ms_ssim(out['x_hat'], target, data_range=1.0))
    return {'loss': distortion + bpp, 'bpp': bpp, 'mse': mse}


def held_out_point(codec: nn.Module, files: Sequence[Path], model_name: str, quality: int) -> Dict[str, float]:
    """Held-out RD point of `codec` over image files (zoo.codecs.metrics.evaluate_codec, real bitstreams): mean bpp
    from the bytes (header included), PSNR and MS-SSIM (None when every image is under 161 px) of the decoded 8-bit
    RGB, the eval-forward estimate `bpp_estimated`, coding seconds and the image count."""
    point = evaluate_codec(codec, model_name, quality, {str(path): load_rgb(path, mode='convert') for path in files})
    return {'bpp': point['bpp'], 'psnr': point['psnr-rgb'], 'ms_ssim': point['ms-ssim-rgb'],
            'bpp_estimated': point['bpp_estimated'], 'encoding_time': point['encoding_time'],
            'decoding_time': point['decoding_time'], 'images': len(files)}


# ---------------------------------------------------------------------------------------------------------------
# training

def _split_parameters(codec: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(main, aux): the EntropyBottleneck `quantiles` are trained only by the aux loss (CompressAI convention)."""
    main, aux = [], []
    for name, param in codec.named_parameters():
        if param.requires_grad:
            (aux if name.endswith('.quantiles') else main).append(param)
    if not aux:
        raise ValueError(f'{type(codec).__name__} has no EntropyBottleneck quantiles to train with the aux loss')
    return main, aux


class _WholeImages(Dataset):
    """Whole images, (3, H, W) uint8, for the per-epoch held-out validation (batch size 1: sizes differ)."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_rgb(self.files[index], mode='convert')


class CompressionModule(TaskModule):
    """A codec trained on the RD loss with a main and an aux optimizer (Lightning manual optimization).

    `global_step` counts main-optimizer updates only (the aux optimizer steps outside Lightning's step counter), so
    the per-update LR schedule and `trainer.checkpoint_every_steps` mean the same as in the other tasks.
    """

    def __init__(self, recipe: Recipe, quality: int, lmbda: float, run_dir: Optional[Path] = None):
        super().__init__(recipe, run_dir)
        self.automatic_optimization = False
        self.quality = quality
        self.lmbda = lmbda
        self.codec = create_codec(recipe.model.name, quality, **recipe.model.kwargs)
        if recipe.model.checkpoint:  # e.g. fine-tune an MS-SSIM model from an MSE one (CompressAI's practice)
            start, _ = load_codec(recipe.model.checkpoint)
            try:
                self.codec.load_state_dict(start.state_dict())
            except RuntimeError as err:
                raise ValueError(f'model.checkpoint {recipe.model.checkpoint} does not fit {recipe.model.name} '
                                 f'{recipe.model.kwargs}: {err}') from None

    def parameter_groups(self):
        return _split_parameters(self.codec)[0]

    def configure_optimizers(self):
        aux_optimizer = torch.optim.Adam(_split_parameters(self.codec)[1], lr=self.recipe.optim.aux_lr)
        return [self.create_main_optimizer(), aux_optimizer]

    def on_fit_start(self):
        # the codecs are conv-heavy (s2lic_tiny: the full-resolution enhancement blocks are ~40 % of a step), and
        # oneDNN convs are faster channels-last: 1.5x for a CPU training step of s2lic_tiny at 8x128^2, 1.2x for
        # bmshj2018-hyperprior (benchmarks/compression_train_step.py, benchmarks/RESULTS.md). Weights go back to the
        # standard layout before saving and bitstream coding (on_fit_end).
        self.codec.to(memory_format=torch.channels_last)

    def on_fit_end(self):
        self.codec.to(memory_format=torch.contiguous_format)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        """batch: (B, 3, crop, crop) float in [0, 1]."""
        self.check_batch_finite(batch, batch_idx)
        batch = batch.contiguous(memory_format=torch.channels_last)
        terms = rate_distortion_loss(self.codec(batch), batch, self.lmbda, self.recipe.loss.metric)
        self.log_training_loss(terms['loss'], batch_idx, batch.shape[0],
                               {'bpp': terms['bpp'], 'psnr': -10 * torch.log10(terms['mse'].detach())})
        optimizer, aux_optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(terms['loss'])
        if self.recipe.trainer.clip_grad:
            self.clip_gradients(optimizer, gradient_clip_val=self.recipe.trainer.clip_grad,
                                gradient_clip_algorithm='norm')
        optimizer.step()
        aux_loss = self.codec.aux_loss()
        aux_optimizer.zero_grad()
        self.manual_backward(aux_loss)
        aux_optimizer.optimizer.step()  # the raw optimizer: Lightning would count this step in global_step
        self.log('train_aux_loss', aux_loss.detach(), on_step=True, on_epoch=True, batch_size=batch.shape[0])

    def validation_step(self, image: torch.Tensor, batch_idx: int):
        """image: (1, 3, H, W) uint8, a whole held-out image (eval-mode forward, estimated bpp)."""
        height, width = image.shape[2:]
        out = self.codec(padded_input(self.codec, image[0]))
        x_hat = out['x_hat'][:, :, :height, :width]
        target = image.float() / 255
        terms = rate_distortion_loss(dict(out, x_hat=x_hat), target, self.lmbda, self.recipe.loss.metric)
        psnr = psnr_uint8(to_uint8(x_hat[0]), image[0])
        self.log_dict({'val_loss': terms['loss'], 'val_bpp': terms['bpp'], 'val_psnr': psnr}, prog_bar=True,
                      batch_size=1, sync_dist=True)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        # Lightning loads the module through nn.Module.load_state_dict, which would reject CDF tables of another
        # size; CompressionModel.load_state_dict resizes them first
        prefix = 'codec.'
        self.codec.load_state_dict({k[len(prefix):]: v for k, v in checkpoint['state_dict'].items()
                                    if k.startswith(prefix)})


def _data_paths(recipe: Recipe) -> List[Path]:
    """The folders the recipe's data reads: root/train and root/test for a folder, none for the bundled photos."""
    if recipe.data.name != 'folder':
        return []
    root = data_root(recipe, 'a folder with train/ and test/ images')
    return [root / 'train', root / 'test']


def _data_files(recipe: Recipe) -> Tuple[List[Path], List[Path], bool]:
    """(training files, held-out test files, whether to cache decoded training images)."""
    d = recipe.data
    if d.name == 'photos':
        return ([photo_path(n) for n in photo_names('train')], [photo_path(n) for n in photo_names('test')], True)
    if d.name == 'folder':
        train_dir, test_dir = _data_paths(recipe)
        return image_files(train_dir), image_files(test_dir), False
    raise ValueError(f"compression data.name must be 'photos' (bundled scikit-image photos) or 'folder' "
                     f"(data.root with train/ and test/), got {d.name!r}")


def _check_training_setup(recipe: Recipe, codec: nn.Module) -> None:
    multiple = int(getattr(codec, 'pad_multiple', 64))
    crop = recipe.data.img_size
    if crop % multiple:
        raise ValueError(f'data.img_size (the training crop) must be a multiple of {recipe.model.name}\'s '
                         f'pad_multiple {multiple}, got {crop}')
    if recipe.loss.metric == 'ms-ssim' and crop < MS_SSIM_MIN_SIDE:
        raise ValueError(f'loss.metric=ms-ssim needs training crops of at least {MS_SSIM_MIN_SIDE} px, '
                         f'got data.img_size={crop}')


def _train_quality(recipe: Recipe, output: str, resume: Optional[str]) -> Dict:
    """Train one quality (recipe.model.quality is an int) into `output`."""
    quality = recipe.model.quality
    lmbda = resolve_lambda(recipe, quality)
    out = start_run(recipe, output)
    train_files, test_files, cache = _data_files(recipe)
    d = recipe.data
    crops = RandomCropDataset(train_files, d.img_size, d.train_size, cache=cache)
    data = RunData(recipe, crops, _WholeImages(test_files), val_batch_size=1, val_workers=0)
    module = CompressionModule(recipe, quality, lmbda, run_dir=out)
    _check_training_setup(recipe, module.codec)

    def summarize(trainer) -> Dict:
        logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
        return {'model': recipe.model.name, 'quality': quality, 'lmbda': lmbda, 'metric': recipe.loss.metric,
                'steps': trainer.global_step,
                **{name: logged.get(f'{name}_epoch') for name in ('train_loss', 'train_bpp', 'train_psnr',
                                                                   'train_aux_loss')}}

    def export(folder: Path) -> Dict:
        held_out = held_out_point(module.codec, test_files, recipe.model.name, quality)
        checkpoint = folder / f'codec_q{quality}.safetensors'
        save_codec(module.codec, checkpoint, recipe.model.name, quality,
                   {'kwargs': recipe.model.kwargs, 'lmbda': lmbda, 'metric': recipe.loss.metric,
                    'recipe': recipe.path, 'test_bpp': held_out['bpp'], 'test_psnr': held_out['psnr']})
        return {**{f'test_{key}': value for key, value in held_out.items()}, 'checkpoint': str(checkpoint)}

    return fit(module, recipe, out, data, Monitor('val_loss', 'min'), resume, export, summarize)


def train(recipe: Recipe, output: str, resume: Optional[str] = None) -> Dict:
    """Train the recipe's codec at `model.quality` (or at each quality of a list, into OUTPUT/q<quality>/); writes
    the run folder(s) and returns the final metrics (for a list: {'qualities', 'runs'})."""
    if recipe.model.quality is None:
        raise ValueError('model.quality is required for compression recipes (the rate point; it selects lambda '
                         'unless loss.lmbda is set), e.g. --set model.quality=3')
    quality = recipe.model.quality
    if not isinstance(quality, list):
        return _train_quality(recipe, output, resume)
    if resume not in (None, 'last'):
        raise ValueError('with a list of qualities, --resume takes no path: it resumes each quality from its own '
                         'OUTPUT/q<quality>/checkpoints/last.ckpt')
    runs = []
    for q in quality:
        single = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quality=q))
        run_dir = Path(output) / f'q{q}'
        runs.append(_train_quality(single, str(run_dir), resume if (run_dir / 'checkpoints' / 'last.ckpt').is_file()
                                   else None))
    metrics = {'qualities': quality, 'runs': runs}
    write_metrics(Path(output), metrics)
    return metrics


def _check_recipe(recipe: Recipe) -> None:
    """The compression rules: quality range, distortion metric, positive lambdas, fp32 and no accumulation (two
    optimizers under manual optimization), no ImageNet-style `model.pretrained`."""
    source = recipe.path
    quality = recipe.model.quality
    qualities = quality if isinstance(quality, list) else [quality]
    if quality is not None and (not qualities or any(not 0 <= q <= 255 for q in qualities)):
        raise RecipeError(f'{source}: `model.quality` must be an integer 0..255 or a non-empty list of them, got '
                          f'{quality!r}')
    if recipe.loss.lmbda is not None and len(qualities) > 1:
        raise RecipeError(f'{source}: loss.lmbda is one value but model.quality lists several qualities: leave '
                          f'loss.lmbda unset (each quality takes its LAMBDAS value) or train one quality per run')
    if recipe.model.pretrained:
        raise RecipeError(f'{source}: compression recipes do not take `model.pretrained` (start from a codec file '
                          f'with `model.checkpoint`)')
    if recipe.loss.metric not in METRICS:
        raise RecipeError(f'{source}: `loss.metric` must be one of {", ".join(METRICS)}, got {recipe.loss.metric!r}')
    if (recipe.loss.lmbda is not None and recipe.loss.lmbda <= 0) or recipe.optim.aux_lr <= 0:
        raise RecipeError(f'{source}: `loss.lmbda` and `optim.aux_lr` must be positive')
    if recipe.trainer.accumulate != 1:
        raise RecipeError(f'{source}: compression trains with two optimizers (manual optimization): '
                          f'`trainer.accumulate` must be 1, got {recipe.trainer.accumulate}')
    if recipe.trainer.precision not in ('32', '32-true'):
        raise RecipeError(f'{source}: compression trains in fp32 (likelihoods underflow in half precision): '
                          f'`trainer.precision` must be 32-true, got {recipe.trainer.precision!r}')


def _codec_arguments(model_name: str) -> Sequence[str]:
    """Constructor arguments of a codec: a CompressAI architecture's, or a zoo codec's through timm."""
    if not model_name.startswith(COMPRESSAI_PREFIX):
        return timm_constructor_arguments(model_name)
    params = inspect.signature(compressai_architecture(model_name).__init__).parameters
    return sorted(set(params) - {'self', 'args', 'kwargs'})


def _evaluate_command(args: argparse.Namespace) -> None:
    """`zoo eval` for compression: the rate-distortion report of codec files (one per quality, or folders of them)
    against a baseline and Pillow's classic codecs; writes --json (CompressAI-format curves, BD-rates vs --anchor)
    and --plot itself and prints a summary table, so it returns None."""
    from zoo.codecs.report import evaluate_rate_distortion, format_summary
    if not args.checkpoint:
        raise ValueError('--task compression needs --checkpoint FILE (one per quality, repeatable) or a folder of '
                         'codec files')
    if not args.data:
        raise ValueError("--task compression needs --data DIR (a folder of held-out images, or 'photos')")
    if args.device not in (None, 'cpu') or args.amp or args.amp_dtype or args.channels_last:
        raise ValueError('--task compression runs on the CPU in full precision: the entropy coder needs the '
                         'probabilities of encoder and decoder to agree bit for bit (no --device, --amp or '
                         '--channels-last)')
    if not args.results_file or Path(args.results_file).suffix.lower() != '.json':
        raise ValueError('--task compression needs --json OUT.json (the results; curves are also written beside it)')
    summary = evaluate_rate_distortion(args.model or [], codec_files(args.checkpoint), args.data, args.results_file,
                                       plot_path=args.plot, anchor=args.anchor, classic=args.classic,
                                       baseline_checkpoints=codec_files(args.baseline_checkpoint))
    print(format_summary(summary))
    print(f'results: {args.results_file}' + (f', plot: {args.plot}' if args.plot else ''))


def codec_files(paths: Sequence[str]) -> List[str]:
    """Codec files named directly, or found in the model folders among `paths` (codec_q*.safetensors)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob(CODEC_FILE_PATTERN))
            if not found:
                raise FileNotFoundError(f'no codec files ({CODEC_FILE_PATTERN}) in {path}')
            files += [str(f) for f in found]
        else:
            files.append(str(path))
    return files


def _is_codec_folder(folder: Path) -> bool:
    return any(folder.glob(CODEC_FILE_PATTERN))


TASK = Task(name='compression', train=train, evaluate=_evaluate_command,
            check_recipe=_check_recipe, model_arguments=_codec_arguments, recognizes=_is_codec_folder, quality=True,
            data_paths=_data_paths, datasets=('photos', 'folder'))
