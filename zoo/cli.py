"""The `zoo` command: list, train, eval, predict, convert, bench."""
import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import List, Optional

import timm
import torch

import zoo
from zoo import bench
from zoo.manifest import official_entry, verify_listed_checkpoint


def _params_m(name: str) -> float:
    """Parameter count in millions, built on the meta device so that large models cost nothing."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def cmd_list(args: argparse.Namespace) -> int:
    names = zoo.list_models(args.pattern)
    if args.pretrained:
        names = [n for n in names if timm.models.get_pretrained_cfg(n) and timm.models.get_pretrained_cfg(n).url]
    if not names:
        print(f'no zoo model matches {args.pattern!r}', file=sys.stderr)
        return 1
    rows = [('model', 'params(M)', 'top-1', 'weights')]
    for name in names:
        entry = official_entry(name)
        top1 = f'{entry["top1"]:.1f}' if entry and entry.get('top1') is not None else '-'
        cfg = timm.models.get_pretrained_cfg(name)
        rows.append((name, f'{_params_m(name):.2f}', top1, cfg.url if cfg and cfg.url else '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(f'{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}')
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    results = bench.benchmark_models(args.model, baseline=None if args.baseline == 'none' else args.baseline,
                                     batch_sizes=args.batch_size, img_size=args.img_size, device=args.device,
                                     precision=args.precision, warmup=args.warmup, min_iters=args.iters,
                                     min_seconds=args.seconds)
    print(bench.format_table(results))
    if args.json:
        bench.write_json(results, args.json)
    return 0


def _task_module(task: str):
    """zoo.tasks.<task>, whose train(recipe, output, resume) runs a recipe of that task."""
    if importlib.util.find_spec(f'zoo.tasks.{task}') is None:
        raise ValueError(f'task {task!r} has no trainer yet')
    return importlib.import_module(f'zoo.tasks.{task}')


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.recipes import load_recipe, recipe_to_dict
    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        import yaml
        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end='')
        return 0
    task = _task_module(recipe.task)
    output = args.output or str(Path('runs') / Path(args.recipe).stem)
    metrics = task.train(recipe, output, resume=args.resume)
    from lightning_fabric.utilities.rank_zero import rank_zero_only
    if rank_zero_only.rank == 0:  # under DDP every process returns here; one report is enough
        print(json.dumps(metrics, indent=1))
        print(f'run folder: {output} (metrics.json, model/, checkpoints/, logs/)')
    return 0


def _load_for_eval(args: argparse.Namespace):
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and not checkpoint.exists():
        raise ValueError(f'checkpoint not found: {checkpoint}')
    if checkpoint is not None:
        verify_listed_checkpoint(checkpoint)
    if checkpoint is not None and checkpoint.is_dir():
        return timm.create_model(f'local-dir:{checkpoint}', pretrained=True)
    if not args.model:
        raise ValueError('--model is required unless --checkpoint is a model folder (config.json + weights)')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    if checkpoint is None:
        return timm.create_model(args.model, **kwargs)
    overlay = dict(file=str(checkpoint), **kwargs)
    return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _eval_detection(args: argparse.Namespace) -> dict:
    """COCO mAP of a detector folder (`zoo train` of a detection recipe writes DIR/model) on images + COCO json."""
    if not args.checkpoint or not args.ann_file or not args.data:
        raise ValueError('--task detection needs --checkpoint DIR/model (a trained detector), --ann-file JSON and '
                         '--data IMAGE_FOLDER')
    from zoo.tasks.detection import evaluate_checkpoint
    return evaluate_checkpoint(args.checkpoint, args.ann_file, args.data, args.batch_size or 8, args.workers)


def _eval_segmentation(args: argparse.Namespace) -> dict:
    """mIoU / mAcc / aAcc of a segmenter (RUN/model/segmenter.pt or a Lightning .ckpt) on its recipe's validation
    split; the recipe defaults to the run folder's recipe.yaml, --data replaces its data.root."""
    if not args.checkpoint:
        raise ValueError('--task segmentation needs --checkpoint RUN/model/segmenter.pt (or a .ckpt of the run)')
    from zoo.recipes import load_recipe
    from zoo.tasks.segmentation import evaluate
    recipe_path = Path(args.recipe) if args.recipe else Path(args.checkpoint).resolve().parents[1] / 'recipe.yaml'
    if not recipe_path.is_file():
        raise ValueError(f'no recipe at {recipe_path}: pass --recipe (the recipe.yaml of the run)')
    overrides = [f'data.root={args.data}'] if args.data else []
    return evaluate(load_recipe(recipe_path, overrides), args.checkpoint, args.batch_size, args.workers)


def _eval_compression(args: argparse.Namespace) -> None:
    """Rate-distortion evaluation of codec checkpoints (one per quality) against a baseline and Pillow's classic
    codecs on a folder of images; writes --json (CompressAI-format curves, BD-rates vs --anchor) and --plot itself
    and prints a summary table, so it returns None."""
    if not args.checkpoint:
        raise ValueError('--task compression needs --checkpoint FILE (one per quality, repeatable)')
    if not args.data:
        raise ValueError("--task compression needs --data DIR (a folder of held-out images, or 'photos')")
    if not args.json:
        raise ValueError('--task compression needs --json OUT (the results; curves are also written beside it)')
    from zoo.tasks.rate_distortion import evaluate, format_summary
    summary = evaluate(args.model or [], args.checkpoint, args.data, args.json, plot_path=args.plot,
                       anchor=args.anchor, classic=args.classic, baseline_checkpoints=args.baseline_checkpoint)
    print(format_summary(summary))
    print(f'results: {args.json}' + (f', plot: {args.plot}' if args.plot else ''))


def _single(values: Optional[List[str]], flag: str) -> Optional[str]:
    """A flag given at most once (only --task compression takes several --model / --checkpoint)."""
    if values and len(values) > 1:
        raise ValueError(f'{flag} takes one value for this task, got {values}')
    return values[0] if values else None


def cmd_eval(args: argparse.Namespace) -> int:
    if args.task != 'compression':
        args.model, args.checkpoint = _single(args.model, '--model'), _single(args.checkpoint, '--checkpoint')
    metrics = _TASK_EVAL[args.task](args)
    if metrics is None:  # the task wrote its own outputs
        return 0
    print(json.dumps(metrics, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + '\n')
    return 0


def _eval_classification(args: argparse.Namespace) -> dict:
    """top-1 / top-5 of a model and checkpoint on an ImageFolder or the shapes validation split."""
    if not args.data:
        raise ValueError("--data is required: an ImageFolder root or 'shapes'")
    from zoo.data.folder import SafeImageFolder
    from zoo.data.shapes import ShapesClassification
    from zoo.tasks.classification import eval_transform, evaluate
    model = _load_for_eval(args)
    transform = eval_transform(model)
    if args.data == 'shapes':
        dataset = ShapesClassification(args.shapes_size, img_size=model.pretrained_cfg['input_size'][-1],
                                       num_classes=model.num_classes, split='val', transform=transform)
    else:
        dataset = SafeImageFolder(args.data, transform=transform)
        if len(dataset.classes) > model.num_classes:
            raise ValueError(f'{args.data} has {len(dataset.classes)} classes but the model predicts '
                             f'{model.num_classes}')
    return evaluate(model, dataset, batch_size=args.batch_size or 128, workers=args.workers)


_TASK_EVAL = {'classification': _eval_classification, 'detection': _eval_detection,
              'segmentation': _eval_segmentation, 'compression': _eval_compression}


def cmd_predict(args: argparse.Namespace) -> int:
    from zoo.tasks.classification import predict
    model = _load_for_eval(args)
    for path, top in zip(args.images, predict(model, args.images, args.top_k)):
        print(path)
        for label, prob in top:
            print(f'  {prob:7.2%}  {label}')
    return 0


def _gqa_kwargs(args: argparse.Namespace) -> dict:
    """Constructor kwargs of `zoo convert --to-gqa --kv-heads N` (the model's checkpoint filter pools the heads)."""
    if not args.to_gqa:
        if args.kv_heads is not None:
            raise ValueError('--kv-heads only applies with --to-gqa')
        return {}
    if args.kv_heads is None or args.kv_heads < 1:
        raise ValueError(f'--to-gqa needs --kv-heads N with N >= 1, got {args.kv_heads}')
    return dict(num_kv_heads=args.kv_heads)


def cmd_convert(args: argparse.Namespace) -> int:
    """Official (or any) checkpoint file -> OUT/model.safetensors + OUT/config.json, refusing mismatched keys."""
    source = Path(args.input)
    if not source.is_file():
        raise ValueError(f'checkpoint not found: {source}')
    verify_listed_checkpoint(source)
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model_kwargs = dict(kwargs, **_gqa_kwargs(args))
    try:
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(source), **kwargs),
                                  **model_kwargs)
    except TypeError as err:
        if 'num_kv_heads' not in str(err):
            raise
        raise ValueError(f'--to-gqa needs a grouped-query model such as vit_small_patch16_224_gqa; {args.model} has '
                         f'no K/V heads to set') from None
    except RuntimeError as err:
        if 'Error(s) in loading state_dict' not in str(err):
            raise
        raise ValueError(f'{source} does not match {args.model}: {err}') from None
    timm.models.save_for_hf(model, args.output, safe_serialization=True)
    print(f'wrote {Path(args.output) / "model.safetensors"} and config.json ({args.model}, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters); load with '
          f'timm.create_model("local-dir:{args.output}", pretrained=True) after `import zoo`')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='zoo', description='attention-zoo: attention-era vision backbones')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='registered models with parameters, official top-1 and weight location')
    p.add_argument('pattern', nargs='?', default='*', help='glob over model names, e.g. "dinat_*"')
    p.add_argument('--pretrained', action='store_true', help='only models with official weights')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('train', help='train from a recipe YAML')
    p.add_argument('recipe', help='recipe file, e.g. recipes/classification/quickstart.yaml')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a recipe key by dotted path, e.g. --set optim.lr=1e-4 (repeatable)')
    p.add_argument('--output', default=None, help='run folder (default: runs/<recipe name>)')
    p.add_argument('--resume', nargs='?', const='last', default=None,
                   help='continue from a checkpoint (default: OUTPUT/checkpoints/last.ckpt)')
    p.add_argument('--dry-run', action='store_true', help='validate and print the resolved recipe, then exit')
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('eval', help='metrics of a trained model: top-1 / top-5 (classification, an ImageFolder or the '
                                    'shapes set), COCO mAP (detection), mIoU (segmentation), rate-distortion '
                                    '(compression)')
    p.add_argument('--task', default='classification', choices=sorted(_TASK_EVAL))
    p.add_argument('--ann-file', default=None, help='COCO json of the images in --data (detection)')
    p.add_argument('--model', action='extend', nargs='+', default=None,
                   help='registered model name (not needed for a model folder); compression: the model of each RD '
                        'curve (repeatable; default: read from the checkpoints)')
    p.add_argument('--checkpoint', action='extend', nargs='+', default=None,
                   help='weights file (official or ours) or a model folder; compression: codec checkpoints, one per '
                        'quality (repeatable)')
    p.add_argument('--data', default=None,
                   help="classification: ImageFolder root (class sub-folders) or 'shapes'; detection: the image "
                        "folder; segmentation: replaces the recipe's data.root; compression: folder of images or "
                        "'photos' (the held-out bundled photos)")
    p.add_argument('--baseline-checkpoint', action='extend', nargs='+', default=[],
                   help='compression: checkpoints of the baseline codec (e.g. compressai:bmshj2018-hyperprior '
                        'trained with the same recipe), one per quality')
    p.add_argument('--anchor', default='jpeg',
                   help='compression: the curve BD-rates are reported against (a classic codec or a model name)')
    p.add_argument('--classic', nargs='*', default=['jpeg', 'webp', 'avif', 'jpeg2000'],
                   help='compression: Pillow codecs measured on the same images (none: --classic with no value)')
    p.add_argument('--plot', default=None, help='compression: write the RD plot to this PNG')
    p.add_argument('--recipe', default=None, help="segmentation: the run's recipe.yaml (default: beside --checkpoint)")
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--shapes-size', type=int, default=1000, help='images in the shapes validation split')
    p.add_argument('--batch-size', type=int, default=None,
                   help="default: 128 (classification), 8 (detection), the recipe's (segmentation)")
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--json', default=None, help='also write the metrics to this file')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('predict', help='top-5 labels of image files')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--model', default=None, help='registered model name (not needed for a model folder)')
    p.add_argument('--checkpoint', default=None, help='weights file or a model folder written by zoo train/convert')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--top-k', type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser('convert', help='checkpoint file -> safetensors + config.json (timm local-dir folder)')
    p.add_argument('input', help='checkpoint file (official .pth, a training checkpoint, safetensors)')
    p.add_argument('output', help='output folder')
    p.add_argument('--model', required=True, help='registered model name the checkpoint belongs to')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--to-gqa', action='store_true',
                   help='convert a multi-head (MHA) ViT checkpoint into the grouped-query --model: K/V heads are '
                        'mean-pooled in contiguous groups')
    p.add_argument('--kv-heads', type=int, default=None, help='K/V heads of the converted model (with --to-gqa)')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('bench', help='throughput, peak memory, params and MACs vs a timm baseline')
    p.add_argument('--model', nargs='+', required=True, help='models to measure')
    p.add_argument('--baseline', default='convnext_tiny', help="timm model measured first, or 'none'")
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--img-size', type=int, default=None, help="square input size (default: each model's cfg)")
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--precision', default='fp32', choices=sorted(bench.PRECISIONS))
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=3, help='minimum timed iterations')
    p.add_argument('--seconds', type=float, default=2.0, help='minimum timed seconds')
    p.add_argument('--json', default=None, help='also write the results as JSON to this file')
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # RecipeError is a ValueError
        print(f'zoo {args.command}: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
