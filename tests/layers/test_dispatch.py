"""The dispatch table (zoo.layers.kernels.dispatch): the backend every operator runs, per device, dtype and shape.

CUDA cases need no GPU: the rule is asked about a `Call` whose device says cuda. Availability of triton and natten
is pinned per test by monkeypatching the table's availability checks.
"""
import pytest
import torch

from zoo.layers import halo_attention_2d, na2d_av, na2d_qk, neighborhood_attention_2d, window_av, window_qk
from zoo.layers.kernels import dispatch
from zoo.layers.kernels.dispatch import GPU_VERIFIED, OPERATORS, Call, gpu_kernels, reference_only, select

SMALL = (2, 2, 16, 16, 8)  # 256 tokens: dense attention is the faster CPU path in training
LARGE = (2, 2, 40, 40, 8)  # 1600 tokens: past the measured crossover
# operator -> the name its Triton kernel is recorded under in GPU_VERIFIED
TRITON_KERNEL = {'na2d': 'na2d', 'na2d_qk': 'na2d', 'na2d_av': 'na2d', 'halo': 'halo',
                 'window_qk': 'aggregated_window', 'window_av': 'aggregated_window'}
# operators without a Triton kernel (their dispatch is tested with their layers: moh_heads in tests/models/test_moh.py)
PLAIN_PYTORCH = {'moh_heads'}


def cuda(shape=SMALL, dtype=torch.float16, has_rpb=True) -> Call:
    return Call(torch.device('cuda'), dtype, shape, has_rpb)


def cpu(shape=SMALL, dtype=torch.float32, has_rpb=True, needs_grad=True) -> Call:
    """A CPU call, by default one of a training step (dense and blocked split small maps by eval / training)."""
    return Call(torch.device('cpu'), dtype, shape, has_rpb, needs_grad)


@pytest.fixture(autouse=True)
def pinned_availability(monkeypatch):
    """triton installed, natten not, whatever this machine has."""
    monkeypatch.setattr(dispatch, 'triton_available', lambda: True)
    monkeypatch.setattr(dispatch, 'natten_available', lambda: False)


@pytest.fixture
def with_natten(monkeypatch):
    monkeypatch.setattr(dispatch, 'natten_available', lambda: True)


def test_table_covers_every_operator_with_the_reference_last():
    assert set(OPERATORS) == set(TRITON_KERNEL) | PLAIN_PYTORCH
    for name, op in OPERATORS.items():
        assert op.backends[-1].name == 'torch', name
        assert op.choices[:2] == ('auto', 'torch')
        assert sorted(op.choices[2:]) == sorted(b.name for b in op.backends[:-1])
    assert OPERATORS['na2d'].choices == ('auto', 'torch', 'triton', 'natten', 'dense', 'blocked')
    for half in ('na2d_qk', 'na2d_av'):
        assert OPERATORS[half].choices == ('auto', 'torch', 'triton', 'blocked')


def test_fused_na2d_off_cuda_is_dense_for_small_maps_else_blocked_in_float32():
    assert select('na2d', cpu(SMALL)) == 'dense'
    assert select('na2d', cpu(SMALL, needs_grad=False)) == 'blocked'  # eval: the blocked forward is faster
    assert select('na2d', cpu(SMALL, dtype=torch.bfloat16, has_rpb=False)) == 'dense'
    assert select('na2d', cpu(SMALL, dtype=torch.bfloat16, needs_grad=False)) == 'dense'
    assert select('na2d', cpu(LARGE)) == 'blocked'
    assert select('na2d', cpu((4096, 4, 16, 16, 8))) == 'blocked'  # attention matrix too large for dense
    for unmeasured in (torch.float64, torch.bfloat16, torch.float16):
        assert select('na2d', cpu(LARGE, dtype=unmeasured)) == 'torch'
    assert select('na2d', Call(torch.device('meta'), torch.float32, SMALL, True)) == 'dense'
    assert select('na2d', Call(torch.device('meta'), torch.float32, LARGE, True)) == 'torch'


@pytest.mark.parametrize('operator', ['na2d_qk', 'na2d_av'])
def test_na2d_halves_on_cpu_run_blocked_in_float32_else_the_reference(operator):
    assert select(operator, cpu(SMALL)) == 'blocked'
    assert select(operator, cpu(LARGE, has_rpb=False)) == 'blocked'
    for unmeasured in (torch.float64, torch.bfloat16, torch.float16):
        assert select(operator, cpu(LARGE, dtype=unmeasured)) == 'torch'


@pytest.mark.parametrize('operator', ['halo', 'window_qk', 'window_av'])
def test_other_operators_off_cuda_run_the_reference(operator):
    assert select(operator, cpu(SMALL)) == 'torch'
    assert select(operator, cpu(LARGE, has_rpb=False)) == 'torch'


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_on_cuda_auto_runs_triton_exactly_where_its_gpu_check_is_recorded(operator):
    kernel = TRITON_KERNEL[operator]
    expected = 'triton' if kernel in GPU_VERIFIED else 'torch'
    assert select(operator, cuda()) == expected
    assert select(operator, cuda(LARGE, dtype=torch.float32)) == expected
    with gpu_kernels({kernel}):
        assert select(operator, cuda()) == 'triton'
    with gpu_kernels(()):
        assert select(operator, cuda()) == 'torch'
    assert select(operator, cuda()) == expected  # the block restored the recorded set


def test_recorded_gpu_checks():
    """benchmarks/RESULTS.md ("Triton kernels on GPU") records na2d and aggregated_window, not yet halo."""
    assert GPU_VERIFIED == {'na2d', 'aggregated_window'}


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_on_cuda_auto_never_picks_triton_for_float64_or_without_triton(operator, monkeypatch):
    with gpu_kernels({TRITON_KERNEL[operator]}):
        assert select(operator, cuda(dtype=torch.float64)) == 'torch'
        monkeypatch.setattr(dispatch, 'triton_available', lambda: False)
        assert select(operator, cuda()) == 'torch'


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_reference_only_wins_everywhere_and_nests(operator):
    with gpu_kernels({TRITON_KERNEL[operator]}):
        with reference_only():
            with reference_only():
                assert select(operator, cuda()) == 'torch'
            assert select(operator, cuda()) == 'torch'
            assert select(operator, cpu()) == 'torch'
        assert select(operator, cuda()) == 'triton'


def test_natten_runs_fused_na2d_without_rpb_on_cuda_when_no_verified_kernel_can(with_natten, monkeypatch):
    no_rpb = cuda(has_rpb=False)
    assert select('na2d', no_rpb) == 'triton'  # the verified kernel comes first
    with gpu_kernels(()):  # the user leaves the Triton kernel out
        assert select('na2d', no_rpb) == 'natten'
        assert select('na2d', cuda(has_rpb=True)) == 'torch'  # NATTEN >= 0.20 has no rpb
        assert select('na2d', cuda(has_rpb=False, dtype=torch.float64)) == 'torch'
        for half in ('na2d_qk', 'na2d_av'):
            assert select(half, no_rpb) == 'torch'
    monkeypatch.setattr(dispatch, 'triton_available', lambda: False)  # a CUDA machine without triton
    assert select('na2d', no_rpb) == 'natten'
    assert select('na2d', cpu(SMALL, has_rpb=False)) == 'dense'
    assert select('na2d', cpu(LARGE, has_rpb=False)) == 'blocked'


def test_natten_is_never_picked_where_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(dispatch, 'triton_available', lambda: False)
    assert select('na2d', cuda(has_rpb=False)) == 'torch'


def _calls(backend: str, dtype=torch.float32):
    """One zero-argument call per operator, on small CPU tensors."""
    q = torch.randn(1, 2, 8, 8, 16, dtype=dtype)
    attn = torch.rand(1, 2, 8, 8, 9, dtype=dtype)
    table = torch.randn(2 * 6 - 1, 16, dtype=dtype)
    return {
        'na2d': lambda: neighborhood_attention_2d(q, q, q, 3, backend=backend),
        'na2d_qk': lambda: na2d_qk(q, q, 3, backend=backend),
        'na2d_av': lambda: na2d_av(attn, q, 3, backend=backend),
        'halo': lambda: halo_attention_2d(q, q, q, 4, 1, table, table, backend=backend),
        'window_qk': lambda: window_qk(q, q, None, 3, backend=backend),
        'window_av': lambda: window_av(attn, q, 3, backend=backend),
    }


def test_every_operator_asks_the_table(monkeypatch):
    asked = []
    resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, 'resolve', lambda operator, *args, **kw: asked.append(operator) or
                        resolve(operator, *args, **kw))
    for call in _calls('auto').values():
        call()
    assert asked == list(TRITON_KERNEL)


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_unknown_backend_lists_the_operators_choices(operator):
    with pytest.raises(ValueError, match=rf"backend must be one of \('auto', 'torch', 'triton'.*\) for {operator}, "
                                         r"got 'cuda'$"):
        _calls('cuda')[operator]()


@pytest.mark.parametrize('operator', ['na2d_qk', 'na2d_av', 'halo', 'window_qk', 'window_av'])
def test_fused_only_backends_are_rejected_elsewhere_naming_where_they_run(operator):
    for backend in ('natten', 'dense'):
        with pytest.raises(ValueError, match=rf"for {operator}, got '{backend}' \('{backend}' only runs na2d\)"):
            _calls(backend)[operator]()


@pytest.mark.parametrize('operator', ['halo', 'window_qk', 'window_av'])
def test_blocked_is_rejected_outside_neighbourhood_attention(operator):
    with pytest.raises(ValueError, match=rf"for {operator}, got 'blocked' \('blocked' only runs na2d, na2d_qk, "
                                         r"na2d_av\)"):
        _calls('blocked')[operator]()


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_explicit_triton_on_cpu_without_the_interpreter_is_one_clear_error(operator, monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match=rf"backend='triton' cannot run {operator} here: .*TRITON_INTERPRET=1.*"
                                         r"got a cpu tensor"):
        _calls('triton')[operator]()


@pytest.mark.parametrize('operator', sorted(TRITON_KERNEL))
def test_explicit_triton_rejects_float64(operator, monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    with pytest.raises(ValueError, match='take float32, float16 or bfloat16 tensors, got torch.float64'):
        _calls('triton', torch.float64)[operator]()


def test_explicit_backends_are_checked_then_kept():
    meta = torch.empty(SMALL, device='meta')
    assert dispatch.resolve('na2d', 'triton', meta) == 'triton'  # fake kernels give shapes on meta
    assert dispatch.resolve('na2d', 'dense', torch.empty(LARGE)) == 'dense'
    assert dispatch.resolve('na2d', 'natten', meta, has_rpb=False) == 'natten'
    with pytest.raises(ValueError, match="backend='natten' cannot run na2d here: .*relative position bias"):
        dispatch.resolve('na2d', 'natten', meta, has_rpb=True)
    with reference_only():  # only 'auto' is affected
        assert dispatch.resolve('na2d', 'dense', meta) == 'dense'
    with pytest.raises(ValueError, match='unknown operator'):
        dispatch.resolve('na3d', 'auto', meta)
