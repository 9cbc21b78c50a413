"""The `zoo` command: list, train, eval, predict, convert, bench, push."""
import argparse
import fnmatch
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch

import zoo
from zoo import bench
from zoo.manifest import MANIFEST_PATH, load_manifest, model_stats, official_entry, verify_listed_checkpoint
from zoo.progress import quiet
from zoo.tasks import TASK_NAMES, check_paths, get_task, load_recipe, task_of_artifact
from zoo.tasks.inference import add_inference_arguments, add_task_eval_arguments, output_file, write_results


def _params_m(name: str) -> float:
    """Parameter count in millions, built on the meta device so that large models cost nothing."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _model_row(name: str) -> Dict[str, Any]:
    """What `zoo list` says of a registered model: size and cost at its input size (the measured table,
    benchmarks/model_stats.json; parameters counted here for a model it lacks), official top-1, pretrained tags and
    where the default weights are."""
    cfg = timm.models.get_pretrained_cfg(name)
    stats = model_stats().get(name)
    if stats is not None and stats['input_size'] != list(cfg.input_size):
        stats = None  # measured at another input size than the cfg's: not this model's cost
    entry = official_entry(name)
    return {'model': name, 'params_m': stats['params_m'] if stats else round(_params_m(name), 3),
            'gmacs': stats['gmacs'] if stats else None, 'input_size': list(cfg.input_size),
            'top1': entry.get('top1') if entry else None,
            'tags': [pretrained.split('.', 1)[1] for pretrained in timm.list_pretrained(f'{name}.*')],
            'weights': cfg.url or cfg.hf_hub_id or None}


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (what to type), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _unlisted_checkpoint(folder: Path) -> Optional[Dict[str, Any]]:
    """A model folder under checkpoints/ that the manifest does not list, described from its own config; None for a
    folder that is not a model folder."""
    from zoo.tasks.artifact import CONFIG_FILE, artifact_metadata, read_config
    try:
        task = task_of_artifact(folder)
        metadata = artifact_metadata(folder) or {}
        config = read_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    except (ValueError, FileNotFoundError):
        return None
    return {'name': folder.name, 'model': metadata.get('model') or config.get('architecture') or '-', 'task': task,
            'path': _shown_path(folder), 'listed': False, 'metrics': metadata.get('metrics', {})}


def _trained_checkpoints(pattern: str) -> List[Dict[str, Any]]:
    """The checkpoints trained with this repository whose model matches `pattern`: the manifest's trained entries
    (metrics measured by zoo eval), then the other model folders under checkpoints/ (metrics of their training)."""
    root = MANIFEST_PATH.parent
    entries = load_manifest()['trained']
    rows = [{'name': e['name'], 'model': e['model'], 'task': e.get('task', 'classification'),
             'path': _shown_path(root / e['path']), 'listed': True, 'metrics': e.get('metrics', {})} for e in entries]
    listed = {(root / e['path']).resolve() for e in entries}
    folders = sorted(f for f in root.iterdir() if f.is_dir() and f.resolve() not in listed) if root.is_dir() else []
    rows += [row for row in map(_unlisted_checkpoint, folders) if row is not None]
    return [row for row in rows if fnmatch.fnmatch(row['model'], pattern)]


def _value_text(value: Any) -> str:
    """A metric for the table: 4 significant digits, a list as a/b/c."""
    if isinstance(value, (list, tuple)):
        return '/'.join(_value_text(v) for v in value)
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def _print_columns(rows: List[tuple], right: Sequence[int] = ()) -> None:
    """Rows of strings as aligned columns (those in `right` aligned right); the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print('  '.join(cells + [row[-1]]))


def _print_listing(models: List[Dict[str, Any]], trained: List[Dict[str, Any]]) -> None:
    """`zoo list` as tables: the registered models, then the trained checkpoints."""
    dash = '-'
    _print_columns([('model', 'params(M)', 'GMACs', 'input', 'top-1', 'tags', 'weights')] + [
        (m['model'], f'{m["params_m"]:.2f}', dash if m['gmacs'] is None else f'{m["gmacs"]:.2f}',
         'x'.join(map(str, m['input_size'][1:])), dash if m['top1'] is None else f'{m["top1"]:.1f}',
         ','.join(m['tags']) or dash, m['weights'] or dash) for m in models], right=(1, 2, 4))
    if trained:
        print('\ntrained checkpoints (zoo eval --checkpoint PATH; metrics of their evaluation or training):')
        _print_columns([('name', 'model', 'task', 'path', 'metrics')] + [
            (t['name'], t['model'], t['task'], t['path'],
             ', '.join(f'{k} {_value_text(v)}' for k, v in t['metrics'].items()) or dash) for t in trained])


def cmd_list(args: argparse.Namespace) -> int:
    names = zoo.list_models(args.pattern)
    if args.pretrained:
        cfgs = {name: timm.models.get_pretrained_cfg(name) for name in names}
        names = [name for name in names if cfgs[name].url or cfgs[name].hf_hub_id]
    if not names:
        print(f'no zoo model matches {args.pattern!r}', file=sys.stderr)
        return 1
    models, trained = [_model_row(name) for name in names], _trained_checkpoints(args.pattern)
    if args.json:
        print(json.dumps({'models': models, 'trained': trained}, indent=1))
    else:
        _print_listing(models, trained)
    return 0


def _hub_errors() -> tuple:
    """What an unreachable or refusing hub raises: OSError (huggingface_hub's HTTP errors, a missing token, offline
    mode) and the base error of the HTTP client huggingface_hub is built on (a failed connection), which its
    HfHubHTTPError derives from (requests, httpx or httpx2 depending on its version)."""
    from huggingface_hub.errors import HfHubHTTPError
    return (OSError, *HfHubHTTPError.__bases__)


def _pushable_metadata(folder: Path) -> Optional[Dict[str, Any]]:
    """The 'zoo' metadata of a classification model folder (None for a timm folder without it), after checking that
    `folder` is one: a timm local-dir folder (config.json naming an architecture + model.safetensors)."""
    from zoo.tasks.artifact import CONFIG_FILE, WEIGHTS_FILE, artifact_metadata
    if not folder.is_dir():
        raise FileNotFoundError(f'model folder not found: {folder}')
    metadata = artifact_metadata(folder)
    if metadata is not None and metadata['task'] != 'classification':
        raise ValueError(f'{folder} holds a {metadata["task"]} model: zoo push shares classification model folders '
                         f'(timm\'s format) only')
    if not get_task('classification').recognizes(folder):
        raise ValueError(f'{folder} is not a model folder: it needs {CONFIG_FILE} naming a timm architecture and '
                         f'{WEIGHTS_FILE}, as zoo train and zoo convert write them')
    return metadata


def _file_name(path: Optional[str]) -> Optional[str]:
    return Path(path).name if path else path


def _shareable(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The folder's metadata without the local paths of this machine (recipe, data root, base weights): their names."""
    shared = dict(metadata, recipe=_file_name(metadata.get('recipe')))
    if metadata.get('data'):
        shared['data'] = dict(metadata['data'], root=_file_name(metadata['data'].get('root')))
    if metadata.get('base'):
        shared['base'] = dict(metadata['base'], weights=_file_name(metadata['base'].get('weights')))
    return shared


def _model_card(model: torch.nn.Module, metadata: Optional[Dict[str, Any]], repo_id: str, license_id: str) -> Dict:
    """timm's model card fields (README.md of the hub repository) for a model folder and its metadata."""
    cfg = model.pretrained_cfg
    details = {'Model Type': 'Image classification / feature backbone', 'Architecture': cfg['architecture'],
               'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
               'Image size': ' x '.join(map(str, cfg['input_size'][1:])), 'Classes': model.num_classes}
    if metadata is not None:
        base = metadata.get('base') or {}
        data = metadata.get('data') or {}
        details.update({'Training data': data.get('dataset') or data.get('name'),
                        'Recipe': _file_name(metadata.get('recipe')) or '-',
                        'Metrics': {k: _value_text(v) for k, v in metadata.get('metrics', {}).items()}})
        if base:
            start = f'weights {_file_name(base["weights"])}' if base.get('weights') else 'random initialisation'
            details['Trained from'] = f'{base["model"]}, {start}'
            papers = base.get('pretrained_cfg', {})
            if papers.get('paper_name'):
                details['Architecture paper'] = f'{papers["paper_name"]} ({papers.get("paper_ids", "-")})'
    usage = (f"```python\nimport timm\nimport zoo  # registers the architecture with timm\n\n"
             f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n```")
    return {'license': license_id, 'details': details, 'usage': usage,
            'description': cfg.get('description') or f'{cfg["architecture"]} weights shared with attention-zoo.'}


def cmd_push(args: argparse.Namespace) -> int:
    """A model folder (zoo train's RUN/model, zoo convert's output) -> a Hugging Face hub repository, through timm's
    push_to_hf_hub (safetensors weights, config.json with the 'zoo' metadata, a model card)."""
    from timm.models import push_to_hf_hub
    from zoo.tasks.classification import load_model
    folder = Path(args.model_dir)
    metadata = _pushable_metadata(folder)
    model = load_model(str(folder), None)
    license_id = args.license or model.pretrained_cfg.get('license') or 'other'
    try:
        push_to_hf_hub(model, args.repo_id, commit_message=args.commit_message, private=args.private,
                       model_config={'zoo': _shareable(metadata)} if metadata else None,
                       model_card=_model_card(model, metadata, args.repo_id, license_id), safe_serialization=True)
    except _hub_errors() as err:
        reason = (str(err).strip().splitlines() or [''])[0]
        print(f'zoo push: error: could not push {folder} to the Hugging Face hub repository {args.repo_id} '
              f'({type(err).__name__}: {reason}); the upload did not complete', file=sys.stderr)
        return 2
    print(f'pushed {folder} to the Hugging Face hub repository {args.repo_id} (licence: {license_id}); load with '
          f'timm.create_model("hf-hub:{args.repo_id}", pretrained=True) after `import zoo`')
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    results = bench.benchmark_models(args.model, baseline=None if args.baseline == ['none'] else args.baseline,
                                     batch_sizes=args.batch_size, img_size=args.img_size, device=args.device,
                                     precision=args.precision, warmup=args.warmup, min_iters=args.iters,
                                     min_seconds=args.seconds, train=args.train, compile=args.compile)
    print(bench.format_table(results))
    if args.json:
        bench.write_json(results, args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.recipes import recipe_to_dict
    from zoo.tasks.engine import claim_run_folder
    recipe = load_recipe(args.recipe, args.set)
    check_paths(recipe)
    if args.dry_run:
        import yaml
        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end='')
        return 0
    output = args.output or str(Path('runs') / Path(args.recipe).stem)
    from lightning_fabric.utilities.rank_zero import rank_zero_only
    if rank_zero_only.rank == 0:  # the processes Lightning starts for DDP join the run the first one claimed
        claim_run_folder(output, args.resume, args.overwrite)
    metrics = get_task(recipe.task).train(recipe, output, args.resume)
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
    if args.results_file:
        write_results(metrics, args.results_file)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from zoo.tasks.classification import load_model, predict
    from zoo.tasks.inference import Inference
    inference = Inference.from_args(args)
    model = load_model(args.checkpoint, args.model, args.num_classes)
    unreadable = 0
    for path, top, problem in predict(model, args.images, args.top_k, inference):
        if problem:
            print(f'zoo predict: error: {problem}', file=sys.stderr)
            unreadable += 1
            continue
        print(path)
        for label, prob in top:
            print(f'  {prob:7.2%}  {label}')
    return 2 if unreadable else 0


def _gqa_kwargs(args: argparse.Namespace) -> dict:
    """Constructor kwargs of `zoo convert --to-gqa --kv-heads N` (the model's checkpoint filter pools the heads)."""
    if not args.to_gqa:
        if args.kv_heads is not None:
            raise ValueError('--kv-heads only applies with --to-gqa')
        return {}
    if args.kv_heads is None or args.kv_heads < 1:
        raise ValueError(f'--to-gqa needs --kv-heads N with N >= 1, got {args.kv_heads}')
    return dict(num_kv_heads=args.kv_heads)


def _training_checkpoint_weights(source: Path, out_dir: Path) -> Path:
    """The model weights of a `zoo train` checkpoint (Lightning: `model.`-prefixed entries, EMA copy when the run
    kept one) written as a plain safetensors file in `out_dir`; other files are returned unchanged."""
    if source.suffix != '.ckpt':
        return source
    state = zoo.models.read_checkpoint(source)
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
    from zoo.tasks.classification import create_with_weights
    with tempfile.TemporaryDirectory() as scratch:
        weights = _training_checkpoint_weights(source, Path(scratch))
        try:
            model = create_with_weights(args.model, weights, source,
                                        pretrained_cfg_overlay=dict(file=str(weights), **kwargs), **model_kwargs)
        except ValueError as err:
            if 'num_kv_heads' not in str(err):
                raise
            raise ValueError(f'--to-gqa needs a grouped-query model such as vit_small_patch16_224_gqa; {args.model} '
                             f'has no K/V heads to set') from None
    timm.models.save_for_hf(model, args.output, safe_serialization=True)
    print(f'wrote {Path(args.output) / "model.safetensors"} and config.json ({args.model}, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters); load with '
          f'timm.create_model("local-dir:{args.output}", pretrained=True) after `import zoo`')
    return 0


class _SubcommandsWith:
    """argparse subcommands that all take the flags of a parent parser (`zoo COMMAND --quiet`)."""

    def __init__(self, parent: argparse.ArgumentParser, subparsers):
        self.parent, self.subparsers = parent, subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=[self.parent], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='zoo', description='attention-zoo: attention-era vision backbones')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('-q', '--quiet', action='store_true',
                        help='print only the results: no progress bars, no Lightning device summary')
    sub = _SubcommandsWith(common, parser.add_subparsers(dest='command', required=True))

    p = sub.add_parser('list', help='registered models (parameters, GMACs and input size, official top-1, pretrained '
                                    'tags, weight location) and the trained checkpoints in checkpoints/')
    p.add_argument('pattern', nargs='?', default='*', help='glob over model names, e.g. "dinat_*"')
    p.add_argument('--pretrained', action='store_true', help='only models with official weights')
    p.add_argument('--json', action='store_true', help='print the listing as JSON (models and trained checkpoints)')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('push', help="share a model folder on the Hugging Face hub (timm's push_to_hf_hub)")
    p.add_argument('model_dir', help='model folder written by zoo train (RUN/model) or zoo convert')
    p.add_argument('repo_id', help='hub repository, e.g. your-name/nat_mini.quickstart_shapes (created if missing; '
                                   'the token of `huggingface-cli login` or HF_TOKEN)')
    p.add_argument('--license', default=None,
                   help="licence of the weights on the hub (default: the folder's cfg licence, else 'other'; a model "
                        "you trained has none until you choose it)")
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--commit-message', default='Add model', help='message of the hub commit')
    p.set_defaults(func=cmd_push)

    p = sub.add_parser('train', help='train from a recipe YAML')
    p.add_argument('recipe', help='recipe file, e.g. recipes/classification/quickstart.yaml')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a recipe key by dotted path, e.g. --set optim.lr=1e-4 (repeatable)')
    p.add_argument('--output', default=None, help='run folder (default: runs/<recipe name>)')
    p.add_argument('--resume', nargs='?', const='last', default=None,
                   help='continue from a checkpoint (default: OUTPUT/checkpoints/last.ckpt)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run already in the output folder (without it, zoo train refuses to)')
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
    p.add_argument('--results-file', '--json', dest='results_file', default=None, type=output_file('.json', '.csv'),
                   help='also write the metrics to this file: .json, or .csv (one row, like timm validate.py)')
    add_inference_arguments(p)
    add_task_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('predict', help='top-5 labels of image files')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--model', default=None, help='registered model name (not needed for a model folder)')
    p.add_argument('--checkpoint', default=None, help='weights file or a model folder written by zoo train/convert')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--top-k', type=int, default=5)
    add_inference_arguments(p)
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
    p.add_argument('--baseline', nargs='+', default=['convnext_tiny'],
                   help="timm models measured first (ratios are vs the first, e.g. convnext_tiny "
                        "swin_tiny_patch4_window7_224), or 'none'")
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--img-size', type=int, default=None, help="square input size (default: each model's cfg)")
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--precision', default='fp32', choices=sorted(bench.PRECISIONS))
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=3, help='minimum timed iterations')
    p.add_argument('--seconds', type=float, default=2.0, help='minimum timed seconds')
    p.add_argument('--train', action='store_true',
                   help='time a training step (forward + backward, cross-entropy on random labels) instead of eval')
    p.add_argument('--compile', action='store_true', help='wrap every model in torch.compile (warm-up compiles)')
    p.add_argument('--json', default=None, type=output_file('.json'),
                   help='also write the results as JSON to this file')
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with quiet(args.quiet):
            return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # RecipeError is a ValueError
        print(f'zoo {args.command}: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
