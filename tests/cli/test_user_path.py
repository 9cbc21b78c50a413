"""The user path around training: where and how `zoo eval` / `zoo predict` run (device, precision, memory format,
input size, results file), progress and quiet output, and run folders that are not overwritten by accident."""
import csv
import json
import warnings

import pytest
import timm
import torch

from conftest import REPO
from zoo.cli import main
from zoo.tasks.engine import claim_run_folder
from zoo.tasks.inference import Inference, resolve_device, write_results

QUICKSTART_MODEL = REPO / 'checkpoints' / 'quickstart'
TINY_TRAIN = ['data.train_size=16', 'data.val_size=16', 'data.batch_size=16', 'data.img_size=32', 'data.workers=0',
              'schedule.epochs=1']


def _eval_shapes(*flags):
    return ['eval', '--checkpoint', str(QUICKSTART_MODEL), '--data', 'shapes', '--shapes-size', '40', '--workers', '0',
            *flags]


@pytest.mark.parametrize('name,problem', [('gpu0', 'not a device name'), ('tpu', 'not a device name')])
def test_device_names_torch_does_not_know_are_refused(name, problem):
    with pytest.raises(ValueError, match=problem):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without CUDA')
def test_cuda_without_a_cuda_device_is_one_clear_error(capsys):
    assert main(_eval_shapes('--device', 'cuda')) == 2
    assert 'no CUDA device is available here' in capsys.readouterr().err


def test_amp_defaults_to_bfloat16_on_the_cpu():
    args = dict(device='cpu', channels_last=False)
    assert Inference.from_args(_namespace(amp=True, amp_dtype=None, **args)).amp_dtype == torch.bfloat16
    assert Inference.from_args(_namespace(amp=False, amp_dtype='float16', **args)).amp_dtype == torch.float16
    assert Inference.from_args(_namespace(amp=False, amp_dtype=None, **args)).amp_dtype is None


def _namespace(**values):
    import argparse
    return argparse.Namespace(**values)


def test_eval_records_what_was_measured_in_a_csv_like_timm_validate(tmp_path, capsys):
    """--img-size / --crop-pct change the transform, and the one-row CSV holds the same record as the printed JSON
    (model, top-1/top-5 and their errors, input size, crop, device, precision, throughput)."""
    table = tmp_path / 'resized.csv'
    assert main(_eval_shapes('--img-size', '72', '--crop-pct', '0.9', '--results-file', str(table), '--quiet')) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(table, newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]['top1'] == str(printed['top1']) and rows[0]['img_size'] == '72'
    assert printed['img_size'] == 72 and printed['crop_pct'] == 0.9 and printed['model'] == 'nat_mini'
    assert printed['device'] == 'cpu' and printed['amp'] is None and printed['channels_last'] is False
    assert printed['images'] == 40 and printed['images_per_second'] > 0
    assert printed['top1_err'] == pytest.approx(100 - printed['top1'])


def test_amp_and_channels_last_evaluate_the_same_model(tmp_path, capsys):
    """bfloat16 autocast in NHWC scores the quickstart model like full precision does (a broken device or precision
    path would not: the model reads these shapes at 95%)."""
    plain = tmp_path / 'plain.json'
    assert main(_eval_shapes('--results-file', str(plain), '--quiet')) == 0
    fast = tmp_path / 'fast.json'
    assert main(_eval_shapes('--amp', '--channels-last', '--results-file', str(fast), '--quiet')) == 0
    baseline, mixed = json.loads(plain.read_text()), json.loads(fast.read_text())
    assert baseline['img_size'] == 64 and baseline['amp'] is None  # the model folder's own cfg
    assert mixed['amp'] == 'bfloat16' and mixed['channels_last'] is True
    assert baseline['top1'] > 80 and abs(mixed['top1'] - baseline['top1']) <= 5


def test_results_file_must_be_json_or_csv(tmp_path):
    with pytest.raises(ValueError, match='.json or .csv'):
        write_results({'top1': 1.0}, str(tmp_path / 'out.txt'))


@pytest.mark.parametrize('argv,problem', [
    (_eval_shapes('--results-file', 'out.txt'), 'out.txt: use a .json or .csv file name'),
    (['bench', '--model', 'nat_mini', '--json', 'bench.csv'], 'bench.csv: use a .json file name'),
    (['eval', '--task', 'compression', '--checkpoint', 'codec.safetensors', '--data', 'photos', '--json', 'rd.json',
      '--plot', 'rd.txt'], 'rd.txt: use a .png, .pdf or .svg file name'),
])
def test_an_output_file_name_is_refused_before_any_work(argv, problem, capsys):
    """A results file the command could not write would lose the evaluation (minutes on ImageNet-val): its name is
    checked when the command starts, and nothing runs."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    captured = capsys.readouterr()
    assert stop.value.code == 2 and problem in captured.err and captured.out == ''


@pytest.mark.parametrize('flags,problem', [(['--img-size', '0'], '--img-size must be positive'),
                                           (['--crop-pct', '1.5'], '--crop-pct must be in')])
def test_bad_eval_sizes_are_refused(flags, problem, capsys):
    assert main(_eval_shapes(*flags)) == 2
    assert problem in capsys.readouterr().err


def test_eval_shows_progress_on_stderr_unless_quiet(capsys):
    assert main(_eval_shapes()) == 0
    captured = capsys.readouterr()
    assert 'eval' in captured.err and 'batch' in captured.err
    json.loads(captured.out)  # standard output holds the metrics only
    assert main(_eval_shapes('--quiet')) == 0
    assert capsys.readouterr().err == ''


def test_predict_runs_under_amp_and_channels_last(tmp_path, capsys):
    from zoo.data.shapes import ShapesClassification
    image, label = ShapesClassification(1, img_size=64, num_classes=10, split='val')[0]
    path = tmp_path / 'shape.png'
    image.save(path)
    assert main(['predict', str(path), '--checkpoint', str(QUICKSTART_MODEL), '--top-k', '1']) == 0
    plain = capsys.readouterr().out.split()[-1]
    assert main(['predict', str(path), '--checkpoint', str(QUICKSTART_MODEL), '--top-k', '1', '--amp',
                 '--channels-last', '--device', 'cpu']) == 0
    assert capsys.readouterr().out.split()[-1] == plain


def test_predict_names_each_unreadable_file_and_goes_on(tmp_path, capsys):
    """One damaged file among many costs its own prediction only: the others are printed, every unreadable file is
    named on standard error, and the exit status says that some failed."""
    from zoo.data.shapes import ShapesClassification
    good = []
    for index in range(2):
        good.append(tmp_path / f'shape{index}.png')
        ShapesClassification(2, img_size=64, num_classes=10, split='val')[index][0].save(good[-1])
    damaged = tmp_path / 'damaged.jpg'
    damaged.write_bytes(good[0].read_bytes()[:60])
    missing = tmp_path / 'missing.png'
    argv = ['predict', str(good[0]), str(damaged), str(missing), str(good[1]), '--checkpoint', str(QUICKSTART_MODEL),
            '--top-k', '1']
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if not line.startswith(' ')] == [str(good[0]), str(good[1])]
    errors = captured.err.splitlines()
    assert len(errors) == 2 and str(damaged) in errors[0] and str(missing) in errors[1]


def _files_that_are_not_weights(folder):
    """A text file, JPEG bytes, and a torch file and a safetensors file cut in half, each under a weights name."""
    text, image = folder / 'notes.pth', folder / 'photo.pth'
    text.write_text('hello')
    image.write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)))
    whole = folder / 'whole.pth'
    torch.save(timm.create_model('nat_mini').state_dict(), whole)
    cut_torch, cut_safetensors = folder / 'cut.pth', folder / 'cut.safetensors'
    cut_torch.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    weights = (QUICKSTART_MODEL / 'model.safetensors').read_bytes()
    cut_safetensors.write_bytes(weights[:len(weights) // 2])
    return [text, image, cut_torch, cut_safetensors]


@pytest.mark.parametrize('command', ['eval', 'predict', 'convert'])
def test_a_file_that_is_not_weights_is_one_clear_line(tmp_path, capsys, command):
    """Every command that reads a weights file names a damaged or foreign one in one line (the unpickler fails on
    such files with KeyError, IndexError or UnpicklingError, which timm wraps in a RuntimeError)."""
    image = tmp_path / 'shape.png'
    from zoo.data.shapes import ShapesClassification
    ShapesClassification(1, img_size=64, num_classes=10, split='val')[0][0].save(image)
    for junk in _files_that_are_not_weights(tmp_path):
        argv = {'eval': ['eval', '--model', 'nat_mini', '--checkpoint', str(junk), '--data', 'shapes'],
                'predict': ['predict', str(image), '--model', 'nat_mini', '--checkpoint', str(junk)],
                'convert': ['convert', '--model', 'nat_mini', str(junk), str(tmp_path / 'out')]}[command]
        assert main(argv) == 2, junk
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and f'{junk}: not a readable weights file' in errors[0], errors
    assert not (tmp_path / 'out').exists()


def test_a_run_folder_is_not_overwritten_by_accident(tmp_path):
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'checkpoints' / 'last.ckpt').write_bytes(b'weights of a week of training')
    (run / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='already holds a run .*--resume.*--overwrite'):
        claim_run_folder(str(run), resume=None, overwrite=False)
    assert (run / 'checkpoints' / 'last.ckpt').exists()
    claim_run_folder(str(run), resume='last', overwrite=False)  # resuming it is what the folder is for
    with pytest.raises(ValueError, match='pass one'):
        claim_run_folder(str(run), resume='last', overwrite=True)
    claim_run_folder(str(run), resume=None, overwrite=True)
    assert not (run / 'checkpoints').exists() and (run / 'notes.txt').read_text() == 'mine'
    claim_run_folder(str(tmp_path / 'new'), resume=None, overwrite=False)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='is a file'):
        claim_run_folder(str(tmp_path / 'file'), resume=None, overwrite=False)


def test_training_prints_no_third_party_noise_and_nothing_extra_when_quiet(tmp_path, capfd, caplog):
    """Lightning's advertisement and the deprecations inside torchdata / Lightning never show; --quiet also drops the
    device summary and the progress bar; a second run into the same folder needs --overwrite."""
    recipe = str(REPO / 'recipes' / 'classification' / 'quickstart.yaml')
    sets = [a for kv in TINY_TRAIN for a in ('--set', kv)]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        assert main(['train', recipe, '--output', str(tmp_path / 'run'), *sets]) == 0
    loud = capfd.readouterr()
    logged = caplog.text  # Lightning's console is a logger
    assert 'GPU available' in logged and 'Epoch 0' in loud.err  # the bar is on stderr
    for noise in ('Tip:', 'set_vital', 'LeafSpec', 'logging interval'):
        assert noise not in loud.out + loud.err + logged + ' '.join(str(w.message) for w in shown), noise
    caplog.clear()
    assert main(['train', recipe, '--output', str(tmp_path / 'run'), *sets]) == 2
    assert 'already holds a run' in capfd.readouterr().err
    assert main(['train', recipe, '--output', str(tmp_path / 'run'), '--overwrite', '--quiet', *sets]) == 0
    quiet = capfd.readouterr()
    assert quiet.err == '' and 'GPU available' not in quiet.out + caplog.text
    assert json.loads(quiet.out[:quiet.out.rindex('}') + 1])['epochs'] == 1


@pytest.mark.parametrize('setting,problem', [
    (['data.name=imagefolder', 'data.root=/no/such/imagenet'], 'not found: data: /no/such/imagenet/train'),
    (['data.name=imagefolder'], 'data.root is required'),
    (['data.name=imagefoldr'], "data.name must be one of shapes, imagefolder for classification, got 'imagefoldr'"),
    (['model.checkpoint=/no/such/weights.pth'], 'not found: model.checkpoint: /no/such/weights.pth'),
])
def test_dry_run_finds_what_would_fail_later(setting, problem, capsys):
    recipe = str(REPO / 'recipes' / 'classification' / 'quickstart.yaml')
    assert main(['train', recipe, '--dry-run', *[a for kv in setting for a in ('--set', kv)]]) == 2
    assert problem in capsys.readouterr().err


def test_a_damaged_weights_file_in_a_recipe_fails_before_the_run_folder_exists(tmp_path, capsys):
    """zoo train (and --dry-run) reads the recipe's weights files before anything is set up: a damaged one is one
    line naming the key and the file, and no run folder is claimed."""
    recipe = str(REPO / 'recipes' / 'classification' / 'quickstart.yaml')
    for junk in _files_that_are_not_weights(tmp_path):
        for flags in (['--dry-run'], ['--output', str(tmp_path / 'run')]):
            assert main(['train', recipe, '--set', f'model.checkpoint={junk}', *flags]) == 2
            errors = capsys.readouterr().err.strip().splitlines()
            assert len(errors) == 1 and f'model.checkpoint: {junk}: not a readable weights file' in errors[0], errors
    assert not (tmp_path / 'run').exists()


def test_dry_run_checks_every_phase_and_the_teacher(capsys):
    recipe = str(REPO / 'recipes' / 'classification' / 'sparsifiner' / 'sparsifiner_deit_small_in1k.yaml')
    assert main(['train', recipe, '--dry-run']) == 2
    error = capsys.readouterr().err
    assert 'loss.distill.checkpoint: /data/checkpoints/' in error and 'data: /data/imagenet/val' in error
    assert error.count('\n') == 1  # one line, each path once


@pytest.mark.parametrize('task,dataset,first_path', [
    ('detection', 'coco', 'annotations/instances_train2017.json'),
    ('segmentation', 'maskfolder', 'train/images'),
    ('segmentation', 'ade20k', 'images/training'),
    ('compression', 'folder', 'train'),
])
def test_dry_run_checks_the_data_of_every_task(task, dataset, first_path, capsys):
    recipe = str(REPO / 'recipes' / task / 'quickstart.yaml')
    assert main(['train', recipe, '--dry-run', '--set', f'data.name={dataset}']) == 2
    assert f'data.root is required for data.name={dataset}' in capsys.readouterr().err
    assert main(['train', recipe, '--dry-run', '--set', f'data.name={dataset}', '--set', 'data.root=/no/data',
                 '--set', 'data.num_classes=3']) == 2
    assert f'not found: data: /no/data/{first_path}' in capsys.readouterr().err
