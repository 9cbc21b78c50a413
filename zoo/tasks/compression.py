"""Learned image compression: codec factory, codec checkpoints and rate–distortion training from a recipe.

Codecs are CompressAI `CompressionModel`s: the zoo's registered codecs (`s2lic`, `s2lic_small`, `s2lic_tiny`, built
through timm) or CompressAI's architectures as `compressai:<zoo name>` (randomly initialised, never downloaded).

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
    OUTPUT/model/codec_q<quality>.safetensors   the trained codec (save_codec; load with load_codec)
    OUTPUT/metrics.json   train loss/bpp/PSNR (last epoch means) and the held-out evaluation: bpp from the real
                          bitstream bytes (zoo.layers.bitstream, header included), PSNR / MS-SSIM on 8-bit RGB,
                          and the likelihood-estimated bpp for comparison
Per-epoch validation runs the eval-mode forward on the held-out images (estimated bpp) and logs `val_rd_score`, the
negated RD loss, so the engine's max-mode `best.ckpt` keeps the lowest-loss epoch.
"""
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.models import CompressionModel
from pytorch_msssim import ms_ssim
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from zoo.data.photos import RandomCropDataset, image_files, photo_names, photo_path
from zoo.layers.bitstream import (compress_image, decompress_image, load_rgb, mark_entropy_tables_current,
                                  padded_input, refresh_entropy_tables, to_uint8)
from zoo.manifest import verify_listed_checkpoint
from zoo.recipes import Recipe
from zoo.tasks import rate_distortion
from zoo.tasks.rate_distortion import MS_SSIM_MIN_SIDE, estimated_bpp, psnr_uint8
from zoo.tasks.engine import (atomic_write_bytes, build_trainer, check_finite_loss, create_optimizer, create_scheduler,
                              prepare_run_dir, resume_checkpoint, ScheduledModule, write_metrics)

__all__ = ['COMPRESSAI_PREFIX', 'LAMBDAS', 'CHECKPOINT_FORMAT', 'compressai_architecture', 'create_codec',
           'save_codec', 'load_codec', 'resolve_lambda', 'rate_distortion_loss',
           'evaluate_codec', 'CompressionModule', 'train']

COMPRESSAI_PREFIX = 'compressai:'
# lambda per quality index in the L = lambda*255^2*MSE + bpp / lambda*(1-MS-SSIM) + bpp convention.
# MSE q1-q8: CompressAI's zoo models (q1-q6 shared with MLIC/MLIC++); MS-SSIM q1-q6: MLIC/MLIC++.
# Source: ../shared/anchors/s2lic.md section 4 ("assumed from the MLIC/CompressAI lineage"; S2LIC's own are unknown).
LAMBDAS = {
    'mse': {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.18},
    'ms-ssim': {1: 2.4, 2: 4.58, 3: 8.73, 4: 16.64, 5: 31.73, 6: 60.5},
}
CHECKPOINT_FORMAT = 'zoo-codec'
_METADATA_KEY = 'zoo_codec'


# ---------------------------------------------------------------------------------------------------------------
# codecs and codec checkpoints

def compressai_architecture(name: str) -> type:
    """The CompressAI model class behind `compressai:<zoo name>` (e.g. ScaleHyperprior for bmshj2018-hyperprior)."""
    from compressai.zoo.image import cfgs, model_architectures
    zoo_name = name[len(COMPRESSAI_PREFIX):] if name.startswith(COMPRESSAI_PREFIX) else name
    available = sorted(set(model_architectures) & set(cfgs))
    if zoo_name not in available:
        raise ValueError(f'unknown CompressAI model {name!r}; available: '
                         f'{", ".join(COMPRESSAI_PREFIX + n for n in available)}')
    return model_architectures[zoo_name]


def create_codec(name: str, quality: Optional[int] = None, **kwargs) -> CompressionModel:
    """A randomly initialised codec by name.

    `compressai:<zoo name>` builds CompressAI's architecture with that quality's channel counts (quality required;
    `kwargs` such as N, M override them, e.g. a reduced ScaleHyperprior); no weights are downloaded. Other names are
    zoo codecs built with `timm.create_model(name, **kwargs)`; for them `quality` is only a label.

    Raises:
        ValueError: unknown name, unsupported quality or argument, or a model that is not a CompressionModel.
    """
    if name.startswith(COMPRESSAI_PREFIX):
        from compressai.zoo.image import cfgs
        architecture = compressai_architecture(name)
        qualities = cfgs[name[len(COMPRESSAI_PREFIX):]]
        if quality not in qualities:
            raise ValueError(f'{name} needs a quality in {sorted(qualities)}, got {quality!r}')
        names = [p for p in inspect.signature(architecture.__init__).parameters if p not in ('self', 'kwargs')]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f'unknown arguments {unknown} for {name}; allowed: {", ".join(names)}')
        codec = architecture(**{**dict(zip(names, qualities[quality])), **kwargs})
    else:
        import timm

        import zoo  # noqa: F401  (registers the zoo's codecs)
        if not timm.is_model(name):
            raise ValueError(f'unknown codec {name!r}: a zoo codec (s2lic, s2lic_small, s2lic_tiny) or '
                             f'{COMPRESSAI_PREFIX}<CompressAI zoo name>')
        codec = timm.create_model(name, **kwargs)
    if not isinstance(codec, CompressionModel):
        raise ValueError(f'{name} is not an image codec (a compressai CompressionModel), got {type(codec).__name__}')
    return codec


def save_codec(codec: CompressionModel, path, model_name: str, quality: int, metadata: Dict) -> Path:
    """Write the codec's weights and refreshed CDF tables as safetensors, atomically, with JSON metadata
    {'format', 'model', 'quality', 'kwargs' (constructor arguments), + `metadata` (lmbda, metric, ...)}."""
    from safetensors.torch import save
    refresh_entropy_tables(codec)
    record = {'format': CHECKPOINT_FORMAT, 'version': 1, 'model': model_name, 'quality': quality, 'kwargs': {},
              **metadata}
    tensors = {key: value.detach().cpu().contiguous() for key, value in codec.state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={_METADATA_KEY: json.dumps(record)}))
    return path


def load_codec(path) -> Tuple[CompressionModel, Dict]:
    """(codec in eval mode on the CPU, metadata) from a file written by `save_codec`; the CDF tables stored with the
    weights are used as they are (they were refreshed when saved).

    Raises:
        ValueError: missing, truncated or corrupt file, a safetensors file that is not a zoo codec, or weights that
            do not fit the recorded model.
        zoo.manifest.ChecksumError (a ValueError): a file checkpoints/manifest.yaml lists with another sha256.
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'codec checkpoint not found: {path}')
    verify_listed_checkpoint(path)
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f'{path}: not a readable safetensors file (truncated or corrupt?): {err}') from None
    try:
        record = json.loads(metadata[_METADATA_KEY])
        if record.get('format') != CHECKPOINT_FORMAT or not isinstance(record.get('kwargs'), dict):
            raise ValueError(record.get('format'))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError(f'{path}: not a zoo codec checkpoint (no valid {_METADATA_KEY!r} metadata; codecs are saved '
                         f'by zoo.tasks.compression.save_codec)') from None
    codec = create_codec(record['model'], record.get('quality'), **record['kwargs'])
    try:
        codec.load_state_dict(tensors)  # CompressionModel resizes its CDF buffers to the stored tables first
    except RuntimeError as err:
        raise ValueError(f'{path}: the weights do not fit {record["model"]} {record["kwargs"]}: {err}') from None
    mark_entropy_tables_current(codec)
    return codec.eval(), record


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


def evaluate_codec(codec: CompressionModel, files: Sequence[Path], model_name: str, quality: int) -> Dict[str, float]:
    """Held-out RD point of `codec` over image files (zoo.tasks.rate_distortion.evaluate_codec, real bitstreams):
    mean bpp from the bytes (header included), PSNR and MS-SSIM (None when every image is under 161 px) of the
    decoded 8-bit RGB, the eval-forward estimate `bpp_estimated`, coding seconds and the image count."""
    point = rate_distortion.evaluate_codec(codec, model_name, quality,
                                           {str(path): load_rgb(path, mode='convert') for path in files})
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


class CompressionModule(ScheduledModule):
    """A codec trained on the RD loss with a main and an aux optimizer (Lightning manual optimization).

    `global_step` counts main-optimizer updates only (the aux optimizer steps outside Lightning's step counter), so
    the per-update LR schedule and `trainer.checkpoint_every_steps` mean the same as in the other tasks.
    """

    def __init__(self, recipe: Recipe, quality: int, lmbda: float, updates_per_epoch: int,
                 run_dir: Optional[Path] = None):
        super().__init__()
        self.automatic_optimization = False
        self.recipe = recipe
        self.quality = quality
        self.lmbda = lmbda
        self.updates_per_epoch = updates_per_epoch
        self.run_dir = run_dir
        self.codec = create_codec(recipe.model.name, quality, **recipe.model.kwargs)
        if recipe.model.checkpoint:  # e.g. fine-tune an MS-SSIM model from an MSE one (CompressAI's practice)
            start, _ = load_codec(recipe.model.checkpoint)
            try:
                self.codec.load_state_dict(start.state_dict())
            except RuntimeError as err:
                raise ValueError(f'model.checkpoint {recipe.model.checkpoint} does not fit {recipe.model.name} '
                                 f'{recipe.model.kwargs}: {err}') from None
        self.fit_seconds = 0.0

    def configure_optimizers(self):
        main, aux = _split_parameters(self.codec)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        optimizer = create_optimizer(main, self.recipe, world_size)
        aux_optimizer = torch.optim.Adam(aux, lr=self.recipe.optim.aux_lr)
        self.scheduler = create_scheduler(optimizer, self.recipe, self.updates_per_epoch)
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)
        return [optimizer, aux_optimizer]

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
        batch = batch.contiguous(memory_format=torch.channels_last)
        optimizer, aux_optimizer = self.optimizers()
        terms = rate_distortion_loss(self.codec(batch), batch, self.lmbda, self.recipe.loss.metric)
        check_finite_loss(terms['loss'].detach(), self.global_step, self.current_epoch, self.run_dir)
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
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)
        batch_size = batch.shape[0]
        self.log('train_loss', terms['loss'].detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch_size)
        self.log_dict({'train_bpp': terms['bpp'].detach(), 'train_psnr': -10 * torch.log10(terms['mse'].detach()),
                       'train_aux_loss': aux_loss.detach()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log('lr', optimizer.param_groups[0]['lr'], on_step=True, on_epoch=False)

    def validation_step(self, image: torch.Tensor, batch_idx: int):
        """image: (1, 3, H, W) uint8, a whole held-out image (eval-mode forward, estimated bpp)."""
        height, width = image.shape[2:]
        out = self.codec(padded_input(self.codec, image[0]))
        x_hat = out['x_hat'][:, :, :height, :width]
        target = image.float() / 255
        terms = rate_distortion_loss(dict(out, x_hat=x_hat), target, self.lmbda, self.recipe.loss.metric)
        psnr = psnr_uint8(to_uint8(x_hat[0]), image[0])
        self.log_dict({'val_loss': terms['loss'], 'val_rd_score': -terms['loss'], 'val_bpp': terms['bpp'],
                       'val_psnr': psnr}, prog_bar=True, batch_size=1, sync_dist=True)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        # Lightning loads the module through nn.Module.load_state_dict, which would reject CDF tables of another
        # size; CompressionModel.load_state_dict resizes them first
        prefix = 'codec.'
        self.codec.load_state_dict({k[len(prefix):]: v for k, v in checkpoint['state_dict'].items()
                                    if k.startswith(prefix)})


def _data_files(recipe: Recipe) -> Tuple[List[Path], List[Path], bool]:
    """(training files, held-out test files, whether to cache decoded training images)."""
    d = recipe.data
    if d.name == 'photos':
        return ([photo_path(n) for n in photo_names('train')], [photo_path(n) for n in photo_names('test')], True)
    if d.name == 'folder':
        if not d.root:
            raise ValueError('data.root is required for data.name=folder (a folder with train/ and test/ images)')
        return image_files(Path(d.root) / 'train'), image_files(Path(d.root) / 'test'), False
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
    out = prepare_run_dir(recipe, output)
    pl.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    train_files, test_files, cache = _data_files(recipe)
    d = recipe.data
    train_loader = StatefulDataLoader(RandomCropDataset(train_files, d.img_size, d.train_size, cache=cache),
                                      batch_size=d.batch_size, shuffle=True, drop_last=True, num_workers=d.workers,
                                      persistent_workers=d.workers > 0)
    val_loader = DataLoader(_WholeImages(test_files), batch_size=1, num_workers=0)
    if len(train_loader) == 0:
        raise ValueError(f'data.train_size={d.train_size} crops make no full batch of data.batch_size={d.batch_size}')
    module = CompressionModule(recipe, quality, lmbda, len(train_loader), run_dir=out)
    _check_training_setup(recipe, module.codec)
    # manual optimization clips inside training_step; Lightning refuses a Trainer-level clip value with it
    trainer = build_trainer(dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, clip_grad=None)),
                            out, monitor='val_rd_score')
    resume = resume_checkpoint(resume, out)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)  # never unpickle objects
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics = {'model': recipe.model.name, 'quality': quality, 'lmbda': lmbda, 'metric': recipe.loss.metric,
               'epochs': trainer.current_epoch, 'steps': trainer.global_step, 'seconds': round(module.fit_seconds, 1),
               **{name: logged.get(f'{name}_epoch') for name in ('train_loss', 'train_bpp', 'train_psnr',
                                                                  'train_aux_loss')}}
    if trainer.is_global_zero:
        held_out = evaluate_codec(module.codec, test_files, recipe.model.name, quality)
        metrics.update({f'test_{key}': value for key, value in held_out.items()})
        checkpoint = out / 'model' / f'codec_q{quality}.safetensors'
        save_codec(module.codec, checkpoint, recipe.model.name, quality,
                   {'kwargs': recipe.model.kwargs, 'lmbda': lmbda, 'metric': recipe.loss.metric,
                    'recipe': recipe.path, 'test_bpp': held_out['bpp'], 'test_psnr': held_out['psnr']})
        metrics['checkpoint'] = str(checkpoint)
        write_metrics(out, metrics)
    return metrics


def train(recipe: Recipe, output: str, resume: Optional[str] = None) -> Dict:
    """Train the recipe's codec at `model.quality` (or at each quality of a list, into OUTPUT/q<quality>/); writes
    the run folder(s) and returns the final metrics (for a list: {'qualities', 'runs'})."""
    if recipe.phases or recipe.model.pretrained:
        raise ValueError('compression recipes support neither `phases` nor `model.pretrained` (start from a codec '
                         'file with `model.checkpoint`)')
    quality = recipe.model.quality
    if quality is None:
        raise ValueError('model.quality is required for compression recipes (the rate point; it selects lambda '
                         'unless loss.lmbda is set), e.g. --set model.quality=3')
    if not isinstance(quality, list):
        return _train_quality(recipe, output, resume)
    if recipe.loss.lmbda is not None and len(quality) > 1:
        raise ValueError('loss.lmbda is one value but model.quality lists several qualities: leave loss.lmbda unset '
                         '(each quality takes its LAMBDAS value) or train one quality per run')
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
