"""zoo.bench in-process on a tiny timm model: eval and training-step throughput beside several baselines, and the
torch.compile switch."""
import re

import pytest
import torch

from conftest import REPO
from zoo import bench

TINY = dict(batch_sizes=(2,), img_size=32, device='cpu', warmup=0, min_iters=1, min_seconds=0.0, isolate=False)


def test_train_step_runs_forward_and_backward_beside_every_baseline(monkeypatch):
    steps = []
    real_step = bench._train_step
    monkeypatch.setattr(bench, '_train_step', lambda model, x, labels, dtype: steps.append(
        (model.training, x.shape[0])) or real_step(model, x, labels, dtype))
    results = bench.benchmark_models(['test_vit'], baseline=['test_resnet', 'test_convnext'], train=True, **TINY)
    assert [r.model for r in results] == ['test_resnet', 'test_convnext', 'test_vit']
    assert steps and all(training and batch == 2 for training, batch in steps)
    for r in results:
        assert r.mode == 'train' and r.img_per_s[2] > 0 and r.peak_mb[2] > 0
        assert r.vs_baseline[2] == pytest.approx(r.img_per_s[2] / results[0].img_per_s[2])
    table = bench.format_table(results)
    assert table.splitlines()[-1].startswith('train device=cpu')
    assert 'x_base = img/s / test_resnet img/s' in table


def test_the_training_step_leaves_gradients_on_every_trained_parameter():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    bench._train_step(model, torch.randn(3, 3, 2, 2), torch.tensor([0, 4, 2]), None)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_compile_wraps_each_measured_model(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda model: compiled.append(type(model).__name__) or model)
    results = bench.benchmark_models(['test_vit'], baseline=None, compile=True, **TINY)
    assert compiled == ['VisionTransformer'] and results[0].compiled and results[0].mode == 'eval'


def test_the_gpu_session_script_runs_only_files_that_exist():
    """benchmarks/gpu_session.sh runs on a lent GPU whose minutes are scarce: a test file or benchmark it names that
    has moved would cost a session (it did once, when the tests moved into folders)."""
    script = (REPO / 'benchmarks' / 'gpu_session.sh').read_text()
    named = set(re.findall(r'\b((?:tests|benchmarks)/[\w/]+\.py)\b', script))
    assert {'tests/layers/test_na2d_triton.py', 'benchmarks/models_gpu.py'} <= named
    assert sorted(path for path in named if not (REPO / path).is_file()) == []
