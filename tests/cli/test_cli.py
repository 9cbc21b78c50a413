"""The `zoo` command (list, bench, eval of the shipped checkpoints, convert) and the checkpoint manifest."""
import hashlib
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import zoo
from conftest import REPO
from zoo.bench import count_macs
from zoo.manifest import load_manifest


def test_manifest_entries_match_registered_cfgs():
    entries = load_manifest()['official']
    published = {name for name in zoo.list_models() if timm.models.get_pretrained_cfg(name).tag != 'untrained'}
    assert {e['model'] for e in entries} == published  # every model with published weights, no other
    for entry in entries:
        cfg = timm.models.get_pretrained_cfg(f'{entry["model"]}.{entry["tag"]}')
        assert cfg is not None, entry
        assert cfg.url.rsplit('/', 1)[-1] == entry['file'], entry
        assert entry['top1'] is None or 70 < entry['top1'] < 90


@pytest.mark.parametrize('name,paper_gflops', [('nat_mini', 2.7), ('dinat_s_tiny', 4.5)])
def test_macs_match_the_papers(name, paper_gflops):
    """The papers' FLOPs are fvcore multiply-accumulates; ours count NA MACs the FLOP counter cannot see."""
    model = timm.create_model(name).eval()
    assert round(count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9, 1) == paper_gflops


def _zoo(*args):
    return subprocess.run([sys.executable, '-m', 'zoo.cli', *args], capture_output=True, text=True, timeout=600)


STARTUP_CHECK = """
import sys
import warnings
warnings.simplefilter('error', FutureWarning)
import timm
from zoo.cli import build_parser
build_parser()
heavy = sorted({'compressai', 'pytorch_lightning', 'segmentation_models_pytorch'} & set(sys.modules))
assert not heavy, f'starting the zoo command imported {heavy}'
codec = timm.create_model('s2lic_tiny')  # imports CompressAI now, without its torch.jit.script notice
assert type(codec).__name__ == 'S2LIC' and 'compressai' in sys.modules
"""


def test_the_command_imports_no_task_stack_until_it_runs_one():
    """`import zoo` and the `zoo` parser leave out CompressAI and Lightning (seconds of every command): a command
    imports only the task it runs, and S2LIC's network is imported when a codec is created."""
    result = subprocess.run([sys.executable, '-c', STARTUP_CHECK], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_cli_list():
    result = _zoo('list', 'dinat_s_*')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ['model', 'params(M)', 'GMACs', 'input', 'top-1', 'tags', 'weights']
    assert [line.split()[0] for line in lines[1:]] == zoo.list_models('dinat_s_*')
    assert '28.29' in next(line for line in lines if line.startswith('dinat_s_tiny '))


def test_cli_list_unknown_pattern_fails():
    result = _zoo('list', 'nothing_like_this*')
    assert result.returncode == 1 and 'no zoo model matches' in result.stderr


def test_cli_bench_prints_ratios_and_writes_json(tmp_path):
    out = tmp_path / 'bench.json'
    result = _zoo('bench', '--model', 'nat_mini', '--baseline', 'resnet18', '--batch-size', '1', '--img-size', '64',
                  '--warmup', '0', '--iters', '1', '--seconds', '0', '--json', str(out))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ['model', 'params(M)', 'GMACs', 'img/s@1', 'peakMB@1', 'x_base@1']
    rows = json.loads(out.read_text())
    assert [r['model'] for r in rows] == ['resnet18', 'nat_mini']
    assert rows[0]['vs_baseline'] == {'1': 1.0} and rows[1]['img_per_s']['1'] > 0


def test_cli_bench_unknown_model_is_a_clear_error():
    result = _zoo('bench', '--model', 'nat_gigantic', '--baseline', 'none')
    assert result.returncode == 2 and 'unknown model(s): nat_gigantic' in result.stderr


@pytest.mark.parametrize('entry', load_manifest()['trained'], ids=lambda e: e['name'])
def test_shipped_checkpoints_reproduce_their_manifest_metrics(entry, tmp_path):
    """Every checkpoint trained here is re-evaluated with `zoo eval`; the numbers must be the recorded ones."""
    from zoo.manifest import MANIFEST_PATH
    folder = MANIFEST_PATH.parent / entry['path']
    out = tmp_path / 'eval.json'
    if entry.get('task') == 'compression':
        _check_codec_entry(entry, folder, out)
        return
    result = _zoo('eval', '--checkpoint', str(folder), '--data', entry['eval']['data'], '--workers', '0',
                  '--json', str(out))
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    for key in ('top1', 'top5', 'images'):
        assert measured[key] == entry['metrics'][key], key


def _check_codec_entry(entry, folder, out):
    """A shipped codec: real bitstreams of every quality on the held-out photos give the recorded RD points, and
    the BD-rates against the classic codecs re-measured in the same run are the recorded ones. Bytes are exact on
    one machine; the tolerances leave room for float differences between CPUs, far below the gaps between
    points."""
    from zoo.codecs.classic import CLASSIC_CODECS, classic_unavailable
    checkpoints = [str(folder / name) for name in entry['files']]
    classic = sorted(name for name in entry['bd_rate'] if name in CLASSIC_CODECS and not classic_unavailable(name))
    assert 'jpeg' in classic
    result = _zoo('eval', '--task', 'compression', '--model', entry['model'], '--checkpoint', *checkpoints,
                  '--data', entry['eval']['data'], '--json', str(out), '--classic', *classic)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    curve = next(c for c in summary['curves'] if c['name'] == entry['model'])
    assert curve['quality'] == entry['metrics']['quality']
    assert all(curve['decode_matches_forward'])
    assert len(curve['per_image']) == entry['metrics']['images']
    for key, tolerance in (('bpp', 1e-3), ('psnr-rgb', 0.02), ('ms-ssim-rgb', 1e-3)):
        assert curve['results'][key] == pytest.approx(entry['metrics'][key], abs=tolerance), key
    assert summary['bd_rate_pairwise'][entry['model']]['jpeg'] < 0  # a shipped codec beats JPEG at equal PSNR
    for anchor in classic:
        measured = summary['bd_rate_pairwise'][entry['model']][anchor]
        assert measured == pytest.approx(entry['bd_rate'][anchor], abs=0.5), anchor
    _check_shipped_rd_report(entry, folder / 'rd.json')


def _check_shipped_rd_report(entry, path):
    """The shipped rd.json holds the manifest's curve, and every manifest BD-rate (the baseline's too, whose codec
    files are not shipped) is what bd_rate computes from the curves in it."""
    from zoo.codecs.bd_rate import bd_rate
    curves = {curve['name']: curve for curve in json.loads(path.read_text())['curves']}
    ours = curves[entry['model']]
    assert ours['quality'] == entry['metrics']['quality']
    for key in ('bpp', 'psnr-rgb', 'ms-ssim-rgb'):
        assert ours['results'][key] == pytest.approx(entry['metrics'][key], abs=1e-3), key
    for reference, recorded in entry['bd_rate'].items():
        anchor = curves[reference]['results']
        recomputed = bd_rate((anchor['bpp'], anchor['psnr-rgb']), (ours['results']['bpp'], ours['results']['psnr-rgb']),
                             method='pchip')
        assert recomputed == pytest.approx(recorded, abs=0.01), reference


def test_manifest_lists_trained_checkpoints_with_their_recipe_and_hash():
    from zoo.manifest import MANIFEST_PATH, trained_files
    for entry in load_manifest()['trained']:
        files = trained_files(entry)
        assert files, entry['name']
        for name, digest in files.items():
            weights = MANIFEST_PATH.parent / entry['path'] / name
            assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest, weights
        recipes = entry['recipe'] if isinstance(entry['recipe'], list) else [entry['recipe']]
        assert all((MANIFEST_PATH.parents[1] / recipe).is_file() for recipe in recipes)


def _listing(monkeypatch, tmp_path, official=(), trained=()):
    """Point zoo.manifest at a manifest with these entries, written under tmp_path."""
    import zoo.manifest as manifest
    path = tmp_path / 'checkpoints' / 'manifest.yaml'
    path.parent.mkdir()
    path.write_text(json.dumps({'official': list(official), 'trained': list(trained)}))  # JSON is YAML
    monkeypatch.setattr(manifest, 'MANIFEST_PATH', path)
    manifest.load_manifest.cache_clear()
    monkeypatch.setattr(manifest, 'load_manifest', lambda: json.loads(path.read_text()))
    return path.parent


def test_listed_official_file_with_another_hash_is_refused(monkeypatch, tmp_path, capsys):
    from zoo.cli import main
    torch.manual_seed(0)
    model = timm.create_model('nat_mini', embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3)
    good, bad = tmp_path / 'good', tmp_path / 'bad'
    good.mkdir(), bad.mkdir()
    torch.save(model.state_dict(), good / 'nat_mini.pth')
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, bad / 'nat_mini.pth')
    digest = hashlib.sha256((good / 'nat_mini.pth').read_bytes()).hexdigest()
    _listing(monkeypatch, tmp_path, official=[dict(model='nat_mini', file='nat_mini.pth', sha256=digest)])
    zoo.manifest.verify_listed_checkpoint(good / 'nat_mini.pth')
    with pytest.raises(zoo.manifest.ChecksumError, match=f'nat_mini.pth is listed .* sha256 {digest}, but'):
        zoo.manifest.verify_listed_checkpoint(bad / 'nat_mini.pth')
    args = ['convert', '--model', 'nat_mini', str(bad / 'nat_mini.pth'), str(tmp_path / 'out')]
    assert main(args) == 2
    assert 'not the listed checkpoint' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_listed_trained_folder_is_checked_by_location(monkeypatch, tmp_path):
    root = _listing(monkeypatch, tmp_path, trained=[dict(name='mine', path='mine', sha256='0' * 64)])
    (root / 'mine').mkdir()
    (root / 'mine' / 'model.safetensors').write_bytes(b'not the listed weights')
    with pytest.raises(zoo.manifest.ChecksumError, match="listed in manifest.yaml as 'mine'"):
        zoo.manifest.verify_listed_checkpoint(root / 'mine')
    elsewhere = tmp_path / 'copy'
    elsewhere.mkdir()
    (elsewhere / 'model.safetensors').write_bytes(b'unlisted')
    zoo.manifest.verify_listed_checkpoint(elsewhere)  # unlisted files are not checked


def test_listed_codec_file_with_another_hash_is_refused(monkeypatch, tmp_path):
    from zoo.codecs import create_codec, load_codec, save_codec
    root = _listing(monkeypatch, tmp_path, trained=[dict(name='codecs', path='codecs', task='compression',
                                                         files={'codec_q1.safetensors': '0' * 64})])
    path = save_codec(create_codec('s2lic_tiny', 1), root / 'codecs' / 'codec_q1.safetensors', 's2lic_tiny', 1, {})
    with pytest.raises(zoo.manifest.ChecksumError, match="codec_q1.safetensors is listed in manifest.yaml as 'codecs'"):
        load_codec(path)
    unlisted = save_codec(create_codec('s2lic_tiny', 1), root / 'codecs' / 'codec_q2.safetensors', 's2lic_tiny', 2,
                          {})
    assert load_codec(unlisted)[1]['quality'] == 2


def test_convert_mha_vit_to_gqa(tmp_path):
    """zoo convert --to-gqa: K/V heads mean-pooled in contiguous groups (checked here by a direct pooling),
    queries, projections and the head kept; the output folder loads as the grouped-query model."""
    torch.manual_seed(0)
    source = timm.create_model('vit_small_patch16_224', depth=2).state_dict()
    save_file(source, str(tmp_path / 'mha.safetensors'))
    result = _zoo('convert', '--model', 'vit_small_patch16_224_gqa', '--to-gqa', '--kv-heads', '2',
                  '--num-classes', '1000', str(tmp_path / 'mha.safetensors'), str(tmp_path / 'gqa'))
    assert result.returncode != 0 and 'Missing key' in result.stderr  # depth 12 model, depth 2 file: refused
    source = timm.create_model('vit_small_patch16_224').state_dict()
    save_file(source, str(tmp_path / 'mha.safetensors'))
    result = _zoo('convert', '--model', 'vit_small_patch16_224_gqa', '--to-gqa', '--kv-heads', '2',
                  '--num-classes', '1000', str(tmp_path / 'mha.safetensors'), str(tmp_path / 'gqa'))
    assert result.returncode == 0, result.stderr
    model = timm.create_model(f'local-dir:{tmp_path / "gqa"}', pretrained=True)
    state = model.state_dict()
    dim, heads, groups = 384, 6, 2
    qkv_w, qkv_b = source['blocks.5.attn.qkv.weight'], source['blocks.5.attn.qkv.bias']
    pooled_k = qkv_w[dim:2 * dim].reshape(groups, heads // groups, dim // heads, dim).mean(1).reshape(-1, dim)
    pooled_vb = qkv_b[2 * dim:].reshape(groups, heads // groups, dim // heads).mean(1).reshape(-1)
    torch.testing.assert_close(state['blocks.5.attn.k.weight'], pooled_k)
    torch.testing.assert_close(state['blocks.5.attn.v.bias'], pooled_vb)
    torch.testing.assert_close(state['blocks.5.attn.q.weight'], qkv_w[:dim])
    torch.testing.assert_close(state['head.weight'], source['head.weight'])
    assert model.num_classes == 1000


@pytest.mark.parametrize('args,message', [
    (['--model', 'vit_small_patch16_224_gqa', '--to-gqa'], '--to-gqa needs --kv-heads'),
    (['--model', 'vit_small_patch16_224_gqa', '--kv-heads', '2'], '--kv-heads only applies with --to-gqa'),
    (['--model', 'nat_mini', '--to-gqa', '--kv-heads', '2'], 'nat_mini has no K/V heads'),
])
def test_convert_to_gqa_bad_arguments(tmp_path, args, message):
    path = tmp_path / 'x.safetensors'
    save_file({'w': torch.zeros(1)}, str(path))
    result = _zoo('convert', *args, str(path), str(tmp_path / 'out'))
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize('command', [
    ('eval', '--model', 'nat_gigantic', '--checkpoint', 'README.md', '--data', 'shapes'),
    ('predict', 'x.png', '--model', 'nat_gigantic', '--checkpoint', 'README.md'),
    ('convert', 'README.md', 'out', '--model', 'nat_gigantic'),
])
def test_unknown_model_names_are_one_clear_line(command, capsys):
    from zoo.cli import main
    assert main(list(command)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and "unknown model 'nat_gigantic' (see zoo list)" in error, error


def test_convert_a_training_checkpoint_and_summarise_mismatches(tmp_path, capsys):
    """`zoo convert` takes a `zoo train` checkpoint (Lightning, `model.`-prefixed weights) and writes the weights
    the run exported; a checkpoint of another architecture is refused in one short line with counts."""
    from zoo.cli import main
    run = tmp_path / 'run'
    recipe = REPO / 'recipes' / 'classification' / 'quickstart.yaml'
    settings = ['data.train_size=16', 'data.val_size=16', 'data.batch_size=16', 'data.img_size=32', 'data.workers=0',
                'schedule.epochs=1', 'model.embed_dim=64', 'model.depths=[3,4,6,5]', 'model.num_heads=[2,4,8,16]',
                'model.mlp_ratio=3.0', 'model.kernel_size=7']  # nat_mini's own architecture
    assert main(['train', str(recipe), '--output', str(run), *[a for kv in settings for a in ('--set', kv)]]) == 0
    assert main(['convert', str(run / 'checkpoints' / 'last.ckpt'), str(tmp_path / 'converted'), '--model',
                 'nat_mini', '--num-classes', '10']) == 0
    exported = load_file(str(run / 'model' / 'model.safetensors'))
    written = load_file(str(tmp_path / 'converted' / 'model.safetensors'))
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in exported)
    capsys.readouterr()
    assert main(['convert', str(run / 'checkpoints' / 'last.ckpt'), str(tmp_path / 'other'), '--model',
                 'dinat_s_tiny']) == 2
    error = capsys.readouterr().err.strip()
    assert 'does not match dinat_s_tiny' in error and len(error) < 1000 and ' more' in error, error
