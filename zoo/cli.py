"""The `zoo` command: list, train, eval, predict, convert, bench."""
import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import timm
import torch

import zoo
from zoo import bench
from zoo.manifest import official_entry, verify_listed_checkpoint
from zoo.tasks import TASK_NAMES, get_task, load_recipe, task_of_artifact


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


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.recipes import recipe_to_dict
    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        import yaml
        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end='')
        return 0
    output = args.output or str(Path('runs') / Path(args.recipe).stem)
    metrics = get_task(recipe.task).train(recipe, output, args.resume)
    from lightning_fabric.utilities.rank_zero import rank_zero_only
    if rank_zero_only.rank == 0:  # under DDP every process returns here; one report is enough
        print(json.dumps(metrics, indent=1))
        print(f'run folder: {output} (metrics.json, model/, checkpoints/, logs/)')
    return 0


def _single(values: Optional[List[str]], flag: str) -> Optional[str]:
    """A flag given at most once (only --task compression takes several --model / --checkpoint)."""
    if values and len(values) > 1:
        raise ValueError(f'{flag} takes one value for this task, got {values}')
    return values[0] if values else None


def _eval_task(args: argparse.Namespace) -> str:
    """--task, else the task of the --checkpoint model folder (its artifact metadata), else classification."""
    if args.task:
        return args.task
    folders = [path for path in args.checkpoint or () if Path(path).is_dir()]
    return task_of_artifact(folders[0]) if folders else 'classification'


def cmd_eval(args: argparse.Namespace) -> int:
    args.task = _eval_task(args)
    if args.task != 'compression':
        args.model, args.checkpoint = _single(args.model, '--model'), _single(args.checkpoint, '--checkpoint')
    metrics = get_task(args.task).evaluate(args)
    if metrics is None:  # the task wrote its own outputs
        return 0
    print(json.dumps(metrics, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + '\n')
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from zoo.tasks.classification import load_model, predict
    model = load_model(args.checkpoint, args.model, args.num_classes)
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


def _key_mismatch(message: str) -> str:
    """torch's load_state_dict error (every key listed) -> counts and a few examples of each kind."""
    parts = []
    for kind in ('Missing key(s)', 'Unexpected key(s)', 'size mismatch'):
        if kind == 'size mismatch':
            names = re.findall(r'size mismatch for ([^:]+):', message)
        else:
            found = re.search(rf'{re.escape(kind)} in state_dict: (.*?)(?:\. \n|\.\s*$|\n\s)', message, re.S)
            names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if names:
            more = f' and {len(names) - 4} more' if len(names) > 4 else ''
            parts.append(f'{kind}: {", ".join(names[:4])}{more}')
    return '; '.join(parts) or message.splitlines()[0]


def _training_checkpoint_weights(source: Path, out_dir: Path) -> Path:
    """The model weights of a `zoo train` checkpoint (Lightning: `model.`-prefixed entries, EMA copy when the run
    kept one) written as a plain safetensors file in `out_dir`; other files are returned unchanged."""
    if source.suffix != '.ckpt':
        return source
    state = torch.load(str(source), map_location='cpu', weights_only=True)
    weights = state.get('zoo_ema') if isinstance(state, dict) else None
    if weights is None and isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        weights = {k[len('model.'):]: v for k, v in state['state_dict'].items() if k.startswith('model.')}
    if not weights:
        return source
    from safetensors.torch import save_file
    plain = out_dir / f'{source.stem}.safetensors'
    save_file({k: v.contiguous() for k, v in weights.items()}, str(plain))
    return plain


def cmd_convert(args: argparse.Namespace) -> int:
    """Official (or any) checkpoint file, or a `zoo train` .ckpt -> OUT/model.safetensors + OUT/config.json,
    refusing mismatched keys."""
    source = Path(args.input)
    if not source.is_file():
        raise ValueError(f'checkpoint not found: {source}')
    verify_listed_checkpoint(source)
    if not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r} (see zoo list)')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model_kwargs = dict(kwargs, **_gqa_kwargs(args))
    with tempfile.TemporaryDirectory() as scratch:
        weights = _training_checkpoint_weights(source, Path(scratch))
        try:
            model = timm.create_model(args.model, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(weights), **kwargs), **model_kwargs)
        except TypeError as err:
            if 'num_kv_heads' not in str(err):
                raise
            raise ValueError(f'--to-gqa needs a grouped-query model such as vit_small_patch16_224_gqa; {args.model} '
                             f'has no K/V heads to set') from None
        except RuntimeError as err:
            if 'Error(s) in loading state_dict' not in str(err):
                raise
            raise ValueError(f'{source} does not match {args.model}: {_key_mismatch(str(err))}') from None
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
    p.add_argument('--task', default=None, choices=TASK_NAMES,
                   help="default: the task of a --checkpoint model folder written by zoo train, else classification")
    p.add_argument('--model', action='extend', nargs='+', default=None,
                   help='registered model name (not needed for a model folder); compression: the model of each RD '
                        'curve (repeatable; default: read from the checkpoints)')
    p.add_argument('--checkpoint', action='extend', nargs='+', default=None,
                   help='weights file (official or ours) or a model folder; compression: codec files, one per '
                        'quality (repeatable), or folders of them')
    p.add_argument('--data', default=None,
                   help="classification: ImageFolder root (class sub-folders) or 'shapes'; detection: the image "
                        "folder; segmentation: replaces the training data's root; compression: folder of images or "
                        "'photos' (the held-out bundled photos)")
    p.add_argument('--batch-size', type=int, default=None,
                   help="default: 128 (classification), 8 (detection), the recipe's (segmentation)")
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--json', default=None, help='also write the metrics to this file')
    for name in TASK_NAMES:
        get_task(name).add_eval_arguments(p.add_argument_group(f'{name} options'))
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
