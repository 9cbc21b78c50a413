"""`zoo list` (GMACs, input size, tags, trained checkpoints, --json), what a trained model folder says it is, and
`zoo push` against a stand-in for the Hugging Face hub."""
import dataclasses
import fnmatch
import importlib.util
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from timm.models import _hub

import zoo
from conftest import REPO
from tiny_configs import tiny_kwargs
from zoo.bench import count_macs
from zoo.cli import main
from zoo.data.shapes import SHAPE_CLASSES
from zoo.manifest import load_manifest, model_stats, official_entry
from zoo.tasks import load_recipe
from zoo.tasks.artifact import artifact_metadata, record_training, trained_tag

QUICKSTART = REPO / 'recipes' / 'classification' / 'quickstart.yaml'
TINY_RUN = ['data.train_size=32', 'data.val_size=20', 'data.batch_size=16', 'data.eval_batch_size=20',
            'data.workers=0', 'data.img_size=32', 'schedule.epochs=1', 'schedule.warmup_epochs=0']
# fields of a registered cfg that describe its official weights (timm's export drops the weight location itself)
PROVENANCE = ('license', 'paper_name', 'paper_ids', 'origin_url')
WEIGHT_LOCATION = ('url', 'hf_hub_id')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(run folder, metrics) of a one-epoch `zoo train` of the quickstart recipe on a few shapes."""
    run = tmp_path_factory.mktemp('quickstart') / 'run'
    assert main(['train', str(QUICKSTART), '--output', str(run), *[a for kv in TINY_RUN for a in ('--set', kv)]]) == 0
    return run, json.loads((run / 'metrics.json').read_text())


def test_trained_folder_describes_the_trained_model_not_its_base(trained):
    run, metrics = trained
    model = timm.create_model(f'local-dir:{run / "model"}', pretrained=True)
    cfg, registered = model.pretrained_cfg, timm.models.get_pretrained_cfg('nat_mini')
    assert cfg['tag'] == 'quickstart_shapes'  # quickstart.yaml on the shapes set
    assert all(cfg.get(f) is None for f in PROVENANCE + WEIGHT_LOCATION), {f: cfg.get(f) for f in PROVENANCE}
    assert list(cfg['label_names']) == list(SHAPE_CLASSES) and model.num_classes == 10
    assert 'shapes' in cfg['description'] and 'quickstart.yaml' in cfg['description']
    assert f'val_top1={metrics["val_top1"]:.4g}' in cfg['description']
    base = artifact_metadata(run / 'model')['base']
    assert base['model'] == 'nat_mini' and base['weights'] is None  # the quickstart starts from random weights
    assert base['pretrained_cfg'] == {f: getattr(registered, f) for f in ('tag', *PROVENANCE)
                                      if getattr(registered, f) is not None}
    assert base['pretrained_cfg']['tag'] == 'in1k' and base['pretrained_cfg']['license'] == registered.license


def test_a_task_without_timm_config_records_the_registered_base(tmp_path):
    """Detection, segmentation and compression folders carry no timm cfg: `base` takes the registered one."""
    recipe = load_recipe(REPO / 'recipes' / 'detection' / 'quickstart.yaml')
    record_training(tmp_path, recipe, {'val_bbox_mAP': 1.5})
    base, registered = artifact_metadata(tmp_path)['base'], timm.models.get_pretrained_cfg(recipe.model.name)
    assert base['model'] == recipe.model.name and base['weights'] == recipe.model.checkpoint
    assert base['pretrained_cfg'] == {f: getattr(registered, f) for f in ('tag', *PROVENANCE, *WEIGHT_LOCATION)
                                      if getattr(registered, f) is not None}
    assert 'pretrained_cfg' not in json.loads((tmp_path / 'config.json').read_text())


def test_trained_tag_names_the_recipe_and_the_dataset_folder():
    recipe = load_recipe(QUICKSTART)
    finetune = dataclasses.replace(recipe, path='/somewhere/nat_mini_finetune.yaml',
                                   data=dataclasses.replace(recipe.data, name='imagefolder', root='/data/Flowers-102'))
    assert trained_tag(finetune) == 'finetune_flowers_102'  # model name dropped, the folder names the dataset
    assert trained_tag(dataclasses.replace(recipe, path='/r/nat_mini_shapes.yaml')) == 'shapes'  # named once


def test_list_json_shows_cost_input_tags_and_trained_checkpoints(capsys):
    assert main(['list', '--json', 'nat_mini']) == 0
    listing = json.loads(capsys.readouterr().out)
    [row] = listing['models']
    stats = model_stats()['nat_mini']
    assert (row['params_m'], row['gmacs'], row['input_size']) == (stats['params_m'], stats['gmacs'], [3, 224, 224])
    assert row['tags'] == ['in1k'] and row['top1'] == official_entry('nat_mini')['top1']
    [quickstart] = [t for t in listing['trained'] if t['name'] == 'quickstart_nat_mini_shapes']
    manifest_entry = next(e for e in load_manifest()['trained'] if e['name'] == quickstart['name'])
    assert quickstart['metrics'] == manifest_entry['metrics'] and quickstart['task'] == 'classification'
    assert (Path(quickstart['path']) / 'model.safetensors').is_file()


def _stats_script():
    spec = importlib.util.spec_from_file_location('model_stats_script', REPO / 'benchmarks' / 'model_stats.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_stats_table_covers_every_model_at_its_input_size():
    stats = model_stats()
    assert sorted(stats) == zoo.list_models()  # regenerate with benchmarks/model_stats.py after adding a model
    for name, row in stats.items():
        assert row['input_size'] == list(timm.models.get_pretrained_cfg(name).input_size), name
        assert row['params_m'] > 0 and row['gmacs'] > 0, name


@pytest.mark.parametrize('name', ['nat_mini', 'vit_small_patch16_224_gqa'])
def test_model_stats_table_entries_are_current(name):
    assert _stats_script().measure(name) == model_stats()[name]


@pytest.mark.parametrize('name, size', [('nat_mini', 64), ('transnext_micro', 64), ('overlock_xt', 64),
                                        ('halonet_paper_h0', 64),
                                        ('vit_small_patch16_224_kdgqa', 224), ('sparsifiner_deit_small', 224)])
def test_meta_device_counts_like_the_cpu_except_the_cpu_counted_families(name, size):
    """The table counts on the meta device (shapes only) except for the script's CPU_COUNTED families: one small
    model per family shows where the two counts agree."""
    script, kwargs = _stats_script(), tiny_kwargs(name)
    with torch.device('meta'):
        on_meta = count_macs(timm.create_model(name, **kwargs).eval(), torch.empty(1, 3, size, size))
    on_cpu = count_macs(timm.create_model(name, **kwargs).eval(), torch.randn(1, 3, size, size))
    listed = any(fnmatch.fnmatch(name, pattern) for pattern in script.CPU_COUNTED)
    assert (on_meta == on_cpu) != listed, (on_meta, on_cpu)


def test_list_table_shows_cost_input_tags_and_trained_checkpoints(capsys):
    assert main(['list', 'nat_*']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['model', 'params(M)', 'GMACs', 'input', 'top-1', 'tags', 'weights']
    nat_mini = next(line for line in lines if line.startswith('nat_mini ')).split()
    stats = model_stats()['nat_mini']
    assert nat_mini[1:6] == [f'{stats["params_m"]:.2f}', f'{stats["gmacs"]:.2f}', '224x224', '81.8', 'in1k']
    trained_rows = lines[lines.index(next(line for line in lines if line.startswith('trained checkpoints'))) + 2:]
    assert [row.split()[0] for row in trained_rows] == ['quickstart_nat_mini_shapes']  # s2lic is no nat_* model
    assert 'top1 92.2, top5 99.6' in trained_rows[0]


def test_list_shows_a_model_folder_the_manifest_does_not_list(trained, tmp_path, monkeypatch, capsys):
    run, metrics = trained
    checkpoints = tmp_path / 'checkpoints'
    shutil.copytree(run / 'model', checkpoints / 'my_nat')
    (checkpoints / 'notes').mkdir()  # not a model folder: not listed
    monkeypatch.setattr('zoo.cli.MANIFEST_PATH', checkpoints / 'manifest.yaml')
    monkeypatch.setattr('zoo.cli.load_manifest', lambda: {'official': [], 'trained': []})
    assert main(['list', '--json', 'nat_mini']) == 0
    [mine] = json.loads(capsys.readouterr().out)['trained']
    assert mine['name'] == 'my_nat' and mine['listed'] is False and mine['task'] == 'classification'
    assert mine['metrics'] == metrics


class FakeHub:
    """Stands in for huggingface_hub.HfApi inside timm's push_to_hf_hub: repositories are folders under `root`."""
    root: Path = None

    def __init__(self, token=None, library_name=None, library_version=None):
        pass

    def create_repo(self, repo_id, private=False, exist_ok=False):
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def file_exists(self, repo_id, filename, revision=None):
        return (self.root / repo_id / filename).is_file()

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f'{repo_id}@commit'


def test_push_uploads_the_trained_folder_in_timm_hub_format(trained, tmp_path, monkeypatch, capsys):
    run, metrics = trained
    monkeypatch.setattr(FakeHub, 'root', tmp_path / 'hub')
    monkeypatch.setattr(_hub, 'HfApi', FakeHub)
    assert main(['push', str(run / 'model'), 'me/nat_mini.quickstart_shapes']) == 0
    assert 'pushed' in capsys.readouterr().out
    repo = tmp_path / 'hub' / 'me' / 'nat_mini.quickstart_shapes'
    assert sorted(p.name for p in repo.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((repo / 'config.json').read_text())
    assert config['pretrained_cfg']['tag'] == 'quickstart_shapes' and 'license' not in config['pretrained_cfg']
    assert config['zoo']['recipe'] == 'quickstart.yaml' and config['zoo']['metrics'] == metrics  # no local paths
    readme = (repo / 'README.md').read_text()
    assert 'license: other' in readme and 'quickstart.yaml' in readme
    assert 'hf-hub:me/nat_mini.quickstart_shapes' in readme
    x = torch.randn(2, 3, 32, 32)
    original = timm.create_model(f'local-dir:{run / "model"}', pretrained=True).eval()
    pushed = timm.create_model(f'local-dir:{repo}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(original(x), pushed(x))


@pytest.mark.parametrize('make, message', [
    (lambda folder: None, 'model folder not found'),
    (lambda folder: folder.mkdir(), 'is not a model folder: it needs config.json'),
    (lambda folder: (folder.mkdir(), (folder / 'config.json').write_text(json.dumps(
        {'zoo': {'format': 'zoo-artifact', 'version': 1, 'task': 'detection'}}))), 'holds a detection model'),
])
def test_push_refuses_what_is_not_a_classification_model_folder(make, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_hub, 'HfApi', None)  # nothing may reach the hub
    folder = tmp_path / 'folder'
    make(folder)
    assert main(['push', str(folder), 'me/model']) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_push_without_network_is_one_clear_line(monkeypatch, capsys):
    """The shipped quickstart folder pushed to a hub at an address nothing answers (connection refused)."""
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_token')
    assert main(['push', str(REPO / 'checkpoints' / 'quickstart'), 'me/model']) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.startswith('zoo push: error: could not push')
    assert len(captured.err.strip().splitlines()) == 1, captured.err
