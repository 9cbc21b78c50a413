"""Recipe schema, inheritance, overrides and the errors a user sees for a broken recipe."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from zoo.recipes import RecipeError, parse_overrides, recipe_to_dict, save_recipe
from zoo.tasks import load_recipe

RECIPES = sorted((REPO / 'recipes').rglob('*.yaml'))


@pytest.mark.parametrize('path', RECIPES, ids=[str(p.relative_to(REPO / 'recipes')) for p in RECIPES])
def test_every_recipe_in_the_repo_is_valid_and_cites_its_source(path):
    recipe = load_recipe(path)
    assert recipe.source, f'{path} does not say where its numbers come from (`source:`)'


def _write(tmp_path: Path, name: str, tree: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


BASE = {'task': 'classification', 'source': 'test', 'model': {'name': 'nat_mini', 'kernel_size': 5},
        'optim': {'lr': 0.001, 'weight_decay': 0.05}, 'schedule': {'epochs': 10}}


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path, 'base.yaml', BASE)
    child = _write(tmp_path, 'child.yaml',
                   {'base': 'base.yaml', 'optim': {'lr': 0.01}, 'model': {'name': 'dinat_mini'}})
    recipe = load_recipe(child, ['schedule.epochs=3', 'data.img_size=64', 'model.drop_path_rate=0.1'])
    assert recipe.optim.lr == 0.01 and recipe.optim.weight_decay == 0.05
    assert recipe.model.name == 'dinat_mini' and recipe.model.kwargs == {'kernel_size': 5, 'drop_path_rate': 0.1}
    assert recipe.schedule.epochs == 3 and recipe.data.img_size == 64


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(_write(tmp_path, 'r.yaml', BASE), ['aug.mixup=0.8'])
    save_recipe(recipe, tmp_path / 'resolved.yaml')
    again = load_recipe(tmp_path / 'resolved.yaml')
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


@pytest.mark.parametrize('tree,overrides,message', [
    ({**BASE, 'optim': {'lr': 0.001, 'weigth_decay': 0.05}}, [],
     r'unknown key `optim.weigth_decay`.*allowed keys of `optim`: name, lr'),
    ({**BASE, 'optimizer': {}}, [], r'unknown top-level key `optimizer`; allowed: task'),
    (BASE, ['schedule.epoch=3'], r'unknown key `schedule.epoch`'),
    (BASE, ['optim.lr=fast'], r'`optim.lr` must be float, got .fast.'),
    ({**BASE, 'model': {'name': 'nat_mini', 'kernel': 7}}, [],
     r'unknown key `model.kernel` for nat_mini; allowed: .*kernel_size'),
    ({**BASE, 'model': {'name': 'nat_gigantic'}}, [], r'unknown model `nat_gigantic`'),
    ({**BASE, 'task': 'detect'}, [], r'`task` must be one of classification'),
    ({k: v for k, v in BASE.items() if k != 'model'}, [], r'`model` section .* is required'),
    (BASE, ['schedule'], r'not of the form section.key=value'),
])
def test_errors_name_the_key_and_the_file(tmp_path, tree, overrides, message):
    path = _write(tmp_path, 'bad.yaml', tree)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path, overrides)
    assert 'parse_overrides' in message or str(path) in str(err.value) or 'override' in str(err.value)


def test_missing_base_and_loops_are_errors(tmp_path):
    with pytest.raises(RecipeError, match='recipe not found'):
        load_recipe(_write(tmp_path, 'a.yaml', {'base': 'nowhere.yaml', **BASE}))
    _write(tmp_path, 'x.yaml', {'base': 'y.yaml', **BASE})
    with pytest.raises(RecipeError, match='loops back'):
        load_recipe(_write(tmp_path, 'y.yaml', {'base': 'x.yaml', **BASE}))


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(['a.b=1', 'a.c=[1, 2]', 'd=null', 'e=1e-4']) == {'a': {'b': 1, 'c': [1, 2]}, 'd': None,
                                                                           'e': 1e-4}


def test_cli_dry_run_prints_resolved_recipe_and_fails_on_bad_key(tmp_path):
    good = _write(tmp_path, 'good.yaml', BASE)
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'train', str(good), '--dry-run', '--set', 'optim.lr=0.5'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)['optim']['lr'] == 0.5
    bad = _write(tmp_path, 'bad.yaml', {**BASE, 'trainer': {'presicion': 'bf16'}})
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'train', str(bad), '--dry-run'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'trainer.presicion' in result.stderr and str(bad) in result.stderr


def test_sync_batchnorm_reaches_the_trainer(tmp_path):
    """trainer.sync_batchnorm turns on Lightning's SyncBN layer sync (applied under DDP strategies only); the
    official downstream bases set it, a single-device quickstart does not."""
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

    from zoo.tasks.engine import Monitor, build_trainer
    base = REPO / 'recipes' / 'segmentation' / 'quickstart.yaml'
    assert load_recipe(REPO / 'recipes' / 'segmentation' / 'overlock' / 'upernet_overlock_t_ade20k.yaml').trainer \
        .sync_batchnorm
    for enabled in (False, True):
        recipe = load_recipe(base, overrides=[f'trainer.sync_batchnorm={str(enabled).lower()}'])
        trainer = build_trainer(recipe, tmp_path / str(enabled), Monitor('val_mIoU'))
        assert isinstance(trainer._accelerator_connector._layer_sync, TorchSyncBatchNorm) == enabled
    with pytest.raises(RecipeError, match='sync_batchnorm'):
        load_recipe(base, overrides=['trainer.sync_batchnorm=sometimes'])
