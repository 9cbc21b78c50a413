"""Object detection and instance segmentation: torchvision Mask R-CNN, RetinaNet and FCOS over any zoo backbone.

The backbone is `timm.create_model(name, features_only=True)` (timm's contract, no family-specific code) under a
torchvision `FeaturePyramidNetwork`. Mask R-CNN uses the stride 4/8/16/32 levels plus a max-pooled P6; RetinaNet
and FCOS use strides 8/16/32 plus P6/P7, as their torchvision defaults (anchor sizes, RoI pooling) expect.
Training runs from a recipe (`head:` holds the detector settings); evaluation is COCO box / mask mAP through
pycocotools. Backbone weights load from a classification checkpoint or from an official mmdet / mmseg
checkpoint (`backbone.` prefix stripped, then the family's `checkpoint_filter_fn`).
"""
import contextlib
import io
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from zoo.data.coco import CocoInstances, detection_collate, shapes_coco
from zoo.models import read_state_dict
from zoo.progress import track
from zoo.recipes import Recipe, RecipeError
from zoo.tasks.artifact import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config, save_weights, write_config
from zoo.tasks.engine import Monitor, RunData, TaskModule, backbone_no_weight_decay, fit, start_run
from zoo.tasks.inference import Inference
from zoo.tasks.protocol import Task, data_root

__all__ = ['ARCHS', 'HeadConfig', 'FeaturePyramidBackbone', 'load_backbone_weights', 'build_detector',
           'validate_images', 'coco_evaluate', 'evaluate', 'DetectionModule', 'build_datasets', 'train',
           'save_detector', 'load_detector', 'evaluate_checkpoint', 'TASK']

# what save_detector's config.json holds for load_detector
_DETECTOR_CONFIG_KEYS = ('model', 'model_kwargs', 'num_classes', 'classes', 'head', 'mean', 'std')
# detector -> backbone strides it reads (the torchvision defaults' anchor sizes and RoI levels assume these)
ARCHS = {'mask_rcnn': (4, 8, 16, 32), 'retinanet': (8, 16, 32), 'fcos': (8, 16, 32)}


class HeadConfig:
    """The recipe's `head:` mapping, validated: unknown keys and bad values are ValueErrors naming them.

    arch: mask_rcnn | retinanet | fcos. min_size: shorter image side after resizing; a list means multi-scale
    training (torchvision draws one per image) and the last entry is used for evaluation. max_size: cap on the
    longer side. fpn_channels: FPN width. score_thresh / detections_per_img: inference filtering.
    rois_per_image: RoIs sampled per image for the Mask R-CNN box/mask losses (mmdet and torchvision: 512).
    """
    DEFAULTS = dict(arch='mask_rcnn', min_size=800, max_size=1333, fpn_channels=256, score_thresh=0.05,
                    detections_per_img=100, rois_per_image=512)

    def __init__(self, head: Optional[Dict[str, Any]] = None):
        head = dict(head or {})
        unknown = sorted(set(head) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f'unknown detection head key(s) {unknown}; allowed: {sorted(self.DEFAULTS)}')
        values = dict(self.DEFAULTS, **head)
        if values['arch'] not in ARCHS:
            raise ValueError(f'head.arch must be one of {sorted(ARCHS)}, got {values["arch"]!r}')
        sizes = values['min_size'] if isinstance(values['min_size'], (list, tuple)) else [values['min_size']]
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f'head.min_size must be a positive int or a list of them, got {values["min_size"]!r}')
        for key in ('max_size', 'fpn_channels', 'detections_per_img', 'rois_per_image'):
            if not isinstance(values[key], int) or values[key] <= 0:
                raise ValueError(f'head.{key} must be a positive int, got {values[key]!r}')
        if values['arch'] == 'fcos' and values['fpn_channels'] % 32:
            raise ValueError(f'fcos needs head.fpn_channels to be a multiple of 32 (its head uses GroupNorm with 32 '
                             f'groups), got {values["fpn_channels"]}')
        self.arch: str = values['arch']
        self.min_size: Tuple[int, ...] = tuple(sizes)
        self.max_size: int = values['max_size']
        self.fpn_channels: int = values['fpn_channels']
        self.score_thresh: float = float(values['score_thresh'])
        self.detections_per_img: int = values['detections_per_img']
        self.rois_per_image: int = values['rois_per_image']

    def to_dict(self) -> Dict[str, Any]:
        return dict(arch=self.arch, min_size=list(self.min_size), max_size=self.max_size,
                    fpn_channels=self.fpn_channels, score_thresh=self.score_thresh,
                    detections_per_img=self.detections_per_img, rois_per_image=self.rois_per_image)


def _to_nchw(feature: torch.Tensor, fmt: str) -> torch.Tensor:
    return feature.permute(0, 3, 1, 2) if fmt == 'NHWC' else feature


class FeaturePyramidBackbone(nn.Module):
    """A timm `features_only` model + FPN, in torchvision's detector-backbone contract.

    forward: (B, C, H, W) normalised images -> OrderedDict '0'..'n' of (B, fpn_channels, H / s, W / s) maps, one per
    requested stride s plus the extra levels; `out_channels` is the FPN width (what the detectors read).
    """

    def __init__(self, body: nn.Module, strides: Sequence[int], fpn_channels: int = 256,
                 extra: str = 'maxpool'):
        super().__init__()
        reductions = list(body.feature_info.reduction())
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f'the detector needs backbone features at strides {tuple(strides)}; this backbone '
                             f'gives strides {reductions} (features_only out_indices), missing {missing}')
        self.body = body
        self.levels = [reductions.index(s) for s in strides]
        self.output_fmt = str(getattr(body, 'output_fmt', 'NCHW')).split('.')[-1]
        self.in_chans = _in_chans(body)
        channels = [body.feature_info.channels()[i] for i in self.levels]
        extra_blocks = LastLevelMaxPool() if extra == 'maxpool' else LastLevelP6P7(fpn_channels, fpn_channels)
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'backbone expects (B, {self.in_chans}, H, W) images, got shape {tuple(x.shape)}')
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), _to_nchw(features[level], self.output_fmt))
                                    for i, level in enumerate(self.levels)))


def _in_chans(body: nn.Module) -> int:
    """Input channels of a features_only model (its wrapped model's, where timm wraps it)."""
    inner = getattr(body, 'model', body)
    return int(getattr(inner, 'in_chans', getattr(body, 'in_chans', 3)))


def load_backbone_weights(body: nn.Module, path: str) -> Dict[str, List[str]]:
    """Load a classification checkpoint or an official mmdet / mmseg one into a features_only `body`.

    A detector / segmentor checkpoint's `backbone.*` entries are kept with the prefix stripped; the result then
    goes through the family's `checkpoint_filter_fn` (official layout -> zoo layout). Every backbone tensor must be
    covered; keys the features_only body has no place for (classifier head, the downstream-only output norms)
    are returned as `unused`. Returns {'loaded': [...], 'unused': [...]}.
    """
    state = read_state_dict(path)
    if any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    model = getattr(body, 'model', body)  # timm's FeatureGetterNet keeps the model as `.model`
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    if wrong_shape or missing:
        raise ValueError(f'{path} does not fit {type(model).__name__}: missing {missing[:8]}'
                         f'{" ..." if len(missing) > 8 else ""}, wrong shape {wrong_shape[:8]}')
    model.load_state_dict({k: state[k] for k in loaded}, strict=True)
    return {'loaded': loaded, 'unused': sorted(set(state) - set(loaded))}


def build_detector(model_name: str, num_classes: int, head: Optional[Dict[str, Any]] = None,
                   model_kwargs: Optional[Dict[str, Any]] = None, checkpoint: Optional[str] = None,
                   mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225)) -> nn.Module:
    """A torchvision detector (`head['arch']`) with `num_classes` object classes over the zoo backbone `model_name`.

    The detector takes a list of (3, H, W) float images in [0, 1] and, in training, targets with `boxes`,
    `labels` in 1..num_classes (0 is background) and, for Mask R-CNN, `masks`.
    """
    config = HeadConfig(head)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
    body = timm.create_model(model_name, features_only=True, **(model_kwargs or {}))
    if checkpoint:
        load_backbone_weights(body, checkpoint)
    extra = 'maxpool' if config.arch == 'mask_rcnn' else 'p6p7'
    backbone = FeaturePyramidBackbone(body, ARCHS[config.arch], config.fpn_channels, extra)
    common = dict(min_size=config.min_size, max_size=config.max_size, image_mean=list(mean), image_std=list(std))
    if config.arch == 'mask_rcnn':
        return MaskRCNN(backbone, None, box_score_thresh=config.score_thresh,
                        box_detections_per_img=config.detections_per_img,
                        box_batch_size_per_image=config.rois_per_image,
                        **_rcnn_heads(config.fpn_channels, num_classes + 1), **common)
    detector_cls = RetinaNet if config.arch == 'retinanet' else FCOS
    detector = detector_cls(backbone, num_classes + 1, score_thresh=config.score_thresh,
                            detections_per_img=config.detections_per_img, **common)
    _silence_class_zero(detector.head.classification_head.cls_logits, num_classes + 1)
    return detector


def _silence_class_zero(cls_logits: nn.Conv2d, classes: int) -> None:
    """Sigmoid heads (RetinaNet, FCOS) score every index, 0 included, but labels here are 1..K as for Mask R-CNN
    (0 = background): a zero weight and a -100 bias make class 0 never score (and its gradients vanish)."""
    with torch.no_grad():
        cls_logits.weight[::classes] = 0
        cls_logits.bias[::classes] = -100.0


def _rcnn_heads(width: int, num_classes: int) -> Dict[str, nn.Module]:
    """Box and mask heads scaled with the FPN width; at width 256 they are torchvision's (and mmdet's) defaults
    (1024-wide box MLP, four 256-channel mask convs), narrower FPNs get proportionally cheaper heads."""
    resolution = 7  # torchvision's MultiScaleRoIAlign output for boxes
    return dict(box_head=TwoMLPHead(width * resolution ** 2, 4 * width),
                box_predictor=FastRCNNPredictor(4 * width, num_classes),
                mask_head=MaskRCNNHeads(width, (width,) * 4, dilation=1),
                mask_predictor=MaskRCNNPredictor(width, width, num_classes))


def validate_images(images: Sequence[torch.Tensor], targets: Optional[Sequence[Dict]] = None) -> None:
    """Raise one ValueError naming the problem unless images are (3, H, W) floats and targets fit them."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f'detectors take a non-empty list of (3, H, W) images, got {type(images).__name__}')
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f'image {i}: expected a (3, H, W) tensor, got {shape}')
        if not image.is_floating_point():
            raise ValueError(f'image {i}: expected float values in [0, 1], got dtype {image.dtype}')
    for i, target in enumerate(targets or ()):
        boxes = target.get('boxes')
        if boxes is None or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f'target {i}: boxes must be (N, 4) xyxy, got '
                             f'{None if boxes is None else tuple(boxes.shape)}')
        if len(target.get('labels', ())) != len(boxes):
            raise ValueError(f'target {i}: {len(boxes)} boxes but {len(target.get("labels", ()))} labels')


def _coco_results(outputs: List[Dict[str, torch.Tensor]], image_ids: List[int],
                  label_to_cat: Dict[int, int]) -> Tuple[List[Dict], List[Dict]]:
    """Detector outputs -> COCO result lists (boxes xywh; masks thresholded at 0.5 and RLE-encoded)."""
    boxes_out, masks_out = [], []
    for output, image_id in zip(outputs, image_ids):
        boxes = output['boxes'].tolist()
        scores, labels = output['scores'].tolist(), output['labels'].tolist()
        masks = output.get('masks')
        for j, ((x0, y0, x1, y1), score, label) in enumerate(zip(boxes, scores, labels)):
            entry = dict(image_id=image_id, category_id=label_to_cat[label], score=score)
            boxes_out.append(dict(entry, bbox=[x0, y0, x1 - x0, y1 - y0]))
            if masks is not None:
                binary = np.asfortranarray((masks[j, 0] > 0.5).numpy().astype(np.uint8))
                rle = mask_utils.encode(binary)
                rle['counts'] = rle['counts'].decode('ascii')
                masks_out.append(dict(entry, segmentation=rle))
    return boxes_out, masks_out


def coco_evaluate(coco_gt, results: List[Dict], iou_type: str, image_ids: List[int]) -> Dict[str, float]:
    """COCO mAP (0-100) of `results` on `image_ids`: {'<type>_mAP', '<type>_mAP_50', '<type>_mAP_75'}."""
    if not results:  # pycocotools cannot load an empty result list; no detections score 0
        return {f'{iou_type}_mAP': 0.0, f'{iou_type}_mAP_50': 0.0, f'{iou_type}_mAP_75': 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, 100 * float(s)) for s in evaluator.stats[:3]]  # -1 means "no ground truth": report 0
    return {f'{iou_type}_mAP': stats[0], f'{iou_type}_mAP_50': stats[1], f'{iou_type}_mAP_75': stats[2]}


def _metrics(dataset: CocoInstances, outputs: List[Dict], image_ids: List[int]) -> Dict[str, float]:
    boxes, masks = _coco_results(outputs, image_ids, dataset.label_to_cat)
    metrics = coco_evaluate(dataset.coco, boxes, 'bbox', image_ids)
    if outputs and 'masks' in outputs[0]:
        metrics.update(coco_evaluate(dataset.coco, masks, 'segm', image_ids))
    return metrics


@torch.no_grad()
def evaluate(detector: nn.Module, dataset: CocoInstances, batch_size: int = 8, workers: int = 0,
             inference: Inference = Inference()) -> Dict[str, float]:
    """COCO box (and, for Mask R-CNN, mask) mAP of `detector` on `dataset`, plus the image count and throughput
    (images per second over the whole loop, image reading included)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=detection_collate)
    detector = inference.prepare(detector)
    outputs, image_ids = [], []
    start = time.perf_counter()
    for images, targets in track(loader, 'eval', unit='batch'):
        validate_images(images)
        with inference.autocast():
            predictions = detector([image.to(inference.device) for image in images])
        outputs += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
                    for o in predictions]
        image_ids += [int(t['image_id']) for t in targets]
    seconds = time.perf_counter() - start
    return dict(_metrics(dataset, outputs, image_ids), images=len(image_ids), seconds=round(seconds, 2),
                images_per_second=round(len(image_ids) / seconds, 2))


class DetectionModule(TaskModule):
    """A detector trained with the summed torchvision losses, timm's optimizer (AdamW) and per-step schedule."""

    def __init__(self, recipe: Recipe, num_classes: int, val_set: CocoInstances, run_dir: Optional[Path] = None):
        super().__init__(recipe, run_dir)
        self.val_set = val_set
        self.detector = build_detector(recipe.model.name, num_classes, recipe.head, recipe.model.kwargs,
                                       recipe.model.checkpoint, **_norm(recipe))
        if recipe.trainer.grad_checkpointing:
            body = self.detector.backbone.body
            getattr(body, 'model', body).set_grad_checkpointing(True)
        self._outputs: List[Dict] = []
        self._image_ids: List[int] = []

    def parameter_groups(self):
        # no decay on 1-d tensors (biases, norms) and on the backbone's own no_weight_decay() names (position
        # biases, tokens), as the official downstream configs exempt them
        return param_groups_weight_decay(self.detector, self.recipe.optim.weight_decay,
                                         backbone_no_weight_decay(self.detector.backbone.body, 'backbone.body.'))

    def optimizer_overrides(self) -> Dict:
        return dict(weight_decay=0.0)  # the groups carry their own decay

    def training_step(self, batch, batch_idx):
        images, targets = batch
        validate_images(images, targets)
        for image in images:
            self.check_batch_finite(image, batch_idx)
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        self.log_training_loss(loss, batch_idx, len(images), losses)
        return loss

    def on_validation_epoch_start(self):
        self._outputs, self._image_ids = [], []

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        validate_images(images)
        self._outputs += [{k: v.cpu() for k, v in o.items()} for o in self.detector(images)]
        self._image_ids += [int(t['image_id']) for t in targets]

    def on_validation_epoch_end(self):
        # each process scores its own share of the validation images (exact on one device)
        metrics = _metrics(self.val_set, self._outputs, self._image_ids)
        self.log_dict({f'val_{k}': v for k, v in metrics.items()}, prog_bar=True, batch_size=len(self._image_ids))


def _norm(recipe: Recipe) -> Dict[str, Tuple[float, ...]]:
    """Image mean/std: the recipe's, else the backbone's pretrained cfg."""
    cfg = timm.get_pretrained_cfg(recipe.model.name)
    cfg = cfg.to_dict() if cfg is not None else {}
    mean = recipe.data.mean or cfg.get('mean', (0.485, 0.456, 0.406))
    std = recipe.data.std or cfg.get('std', (0.229, 0.224, 0.225))
    return dict(mean=tuple(mean), std=tuple(std))


def build_datasets(recipe: Recipe, data_dir: Path) -> Tuple[CocoInstances, CocoInstances]:
    """(train, val) for `data.name` 'shapes' (exported as COCO json under `data_dir`, or `data.root` when set) or
    'coco' (data.root with train2017/, val2017/ and annotations/instances_{train,val}2017.json)."""
    d = recipe.data
    if d.name == 'shapes':
        root = Path(d.root) if d.root else data_dir
        common = dict(img_size=d.img_size, num_classes=d.num_classes or 10, seed=d.seed)
        train = shapes_coco(str(root), 'train', d.train_size, **common)
        val = shapes_coco(str(root), 'val', d.val_size, **common)
    elif d.name == 'coco':
        train_json, train_images, val_json, val_images = _data_paths(recipe)
        train, val = (str(train_json), str(train_images)), (str(val_json), str(val_images))
    else:
        raise ValueError(f"data.name must be 'shapes' or 'coco' for detection, got {d.name!r}")
    train_set, val_set = CocoInstances(*train, hflip=recipe.aug.hflip > 0), CocoInstances(*val)
    if train_set.classes != val_set.classes:
        raise ValueError('train and val annotation files have different categories')
    return train_set, val_set


def save_detector(detector: nn.Module, folder: Path, config: Dict[str, Any]) -> Path:
    """Final weights as folder/model.safetensors + folder/config.json (everything load_detector needs)."""
    save_weights(folder, detector.state_dict())
    write_config(folder, config)
    return folder


def load_detector(folder: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """(detector, config) from a folder written by save_detector (a training run's DIR/model)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f'{folder} is not a detector folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})')
    config = read_config(folder)
    missing = [key for key in _DETECTOR_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f'{folder / CONFIG_FILE} is not a detector config: it lacks {missing}')
    detector = build_detector(config['model'], config['num_classes'], config['head'], config['model_kwargs'],
                              mean=config['mean'], std=config['std'])
    detector.load_state_dict(load_weights(folder / WEIGHTS_FILE), strict=True)
    return detector.eval(), config


def evaluate_checkpoint(folder: str, ann_file: str, image_dir: str, batch_size: int = 8, workers: int = 0,
                        inference: Inference = Inference()) -> Dict[str, float]:
    """COCO mAP of a saved detector on a COCO-json dataset (what `zoo eval --task detection` runs).

    The dataset's categories must be the ones the detector was trained on, in the same sorted order.
    """
    detector, config = load_detector(folder)
    dataset = CocoInstances(ann_file, image_dir)
    if dataset.classes != config['classes']:
        raise ValueError(f'{ann_file} has categories {dataset.classes}, the detector was trained on '
                         f'{config["classes"]}')
    return evaluate(detector, dataset, batch_size=batch_size, workers=workers, inference=inference)


def train(recipe: Recipe, output: str, resume: Optional[str] = None) -> Dict[str, float]:
    """Train the recipe's detector; writes the run folder (zoo.tasks.engine) plus DIR/model, returns the metrics."""
    out = start_run(recipe, output)
    train_set, val_set = build_datasets(recipe, out / 'data')
    data = RunData(recipe, train_set, val_set, detection_collate)
    module = DetectionModule(recipe, train_set.num_classes, val_set, run_dir=out)

    def summarize(trainer) -> Dict:
        final = trainer.validate(module, datamodule=data, verbose=False)[0]
        return {k[len('val_'):]: v for k, v in final.items() if k.startswith('val_')}

    def export(folder: Path) -> None:
        config = dict(model=recipe.model.name, model_kwargs=recipe.model.kwargs, num_classes=train_set.num_classes,
                      classes=train_set.classes, head=HeadConfig(recipe.head).to_dict(), **_norm(recipe))
        save_detector(module.detector, folder, config)

    return fit(module, recipe, out, data, Monitor('val_bbox_mAP', 'max'), resume, export, summarize)


def _data_paths(recipe: Recipe) -> List[Path]:
    """What COCO data reads (train json, train images, val json or data.ann_file, val images); none for shapes."""
    d = recipe.data
    if d.name != 'coco':
        return []
    root = data_root(recipe, 'a folder with train2017/, val2017/ and annotations/')
    return [root / 'annotations' / 'instances_train2017.json', root / 'train2017',
            Path(d.ann_file) if d.ann_file else root / 'annotations' / 'instances_val2017.json', root / 'val2017']


def _check_recipe(recipe: Recipe) -> None:
    try:
        HeadConfig(recipe.head)
    except ValueError as err:
        raise RecipeError(f'{recipe.path}: {err}') from None


def _evaluate_command(args) -> Dict:
    """`zoo eval` for detection: COCO mAP of a detector folder (`zoo train` writes RUN/model) on images + COCO json."""
    if not args.checkpoint or not args.ann_file or not args.data:
        raise ValueError('--task detection needs --checkpoint DIR/model (a trained detector), --ann-file JSON and '
                         '--data IMAGE_FOLDER')
    inference = Inference.from_args(args)
    metrics = evaluate_checkpoint(args.checkpoint, args.ann_file, args.data, args.batch_size or 8, args.workers,
                                  inference)
    return {'checkpoint': args.checkpoint, **metrics, **inference.describe()}


def _is_detector_folder(folder: Path) -> bool:
    """A detector folder written before the artifact metadata existed: its config names a detection head."""
    return (folder / CONFIG_FILE).is_file() and all(key in read_config(folder) for key in _DETECTOR_CONFIG_KEYS)


TASK = Task(name='detection', train=train, evaluate=_evaluate_command,
            check_recipe=_check_recipe, recognizes=_is_detector_folder, data_paths=_data_paths,
            datasets=('shapes', 'coco'))
