"""Sparsifiner: sparse-attention layers, the official masks and token masks, execution paths, distillation pieces,
phase recipes and errors. Logits parity with the official fixtures is in test_parity.py."""
import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import zoo  # noqa: F401
import zoo.models.sparsifiner as sparsifiner_module
from conftest import REPO, fixtures_root
from zoo.bench import count_macs
from zoo.layers.sparse_attn import (ConnectivityPredictor, attention_budget, connectivity_mask, connectivity_topk,
                                    masked_attention, topk_sparse_attention)
from zoo.models.sparsifiner import resolve_attn_impl
from zoo.tasks import load_recipe
from zoo.tasks import classification
from zoo.tasks.distill import (AttentionRecorder, DistillConfig, DistillLoss, kl_to_teacher, patch_token_mse,
                               set_trainable)
from zoo.tasks.phases import phase_recipes

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5, coef_topk=4)


def _case(name: str):
    root = fixtures_root() / 'sparsifiner'
    case = json.loads((root / f'{name}.json').read_text())
    return case, root / f'{name}.state.safetensors', load_file(str(root / f'{name}.io.safetensors'))


def _fixture_model(case, state, **overrides):
    kwargs = dict(case['zoo_kwargs'], **overrides)
    return timm.create_model(case['zoo_name'], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(state), num_classes=kwargs['num_classes']), **kwargs).eval()


def _qkv(batch=2, heads=3, tokens=197, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize('budget,chunk', [(50, 64), (1, 7), (197, 200), (13, 1)])
def test_topk_sparse_attention_equals_masked_dense(budget, chunk):
    q, k, v = [t.requires_grad_() for t in _qkv()]
    scores = torch.randn(2, 3, 196, 197, dtype=torch.float64)
    index = connectivity_topk(scores, budget)
    mask = connectivity_mask(index, 197)
    assert mask[:, :, 0].all() and (mask[:, :, 1:].sum(-1) == budget).all()
    dense_out, dense_cls_attn = masked_attention(q, k, v, mask, 0.25, need_cls_attn=True)
    sparse_out, cls_attn = topk_sparse_attention(q, k, v, index, 0.25, chunk_size=chunk)
    # independent definition: masked_fill + softmax over the full logits
    attn = ((q @ k.transpose(-2, -1)) * 0.25).masked_fill(~mask, float('-inf')).softmax(-1)
    torch.testing.assert_close(dense_out, attn @ v)
    torch.testing.assert_close(dense_cls_attn, attn[:, :, 0])
    torch.testing.assert_close(sparse_out, dense_out)
    torch.testing.assert_close(cls_attn, dense_cls_attn)
    grads_dense = torch.autograd.grad(dense_out.square().sum(), (q, k, v))
    grads_sparse = torch.autograd.grad(sparse_out.square().sum(), (q, k, v))
    for got, expected in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(got, expected)


def test_pruned_keys_are_never_kept_and_budget_rule():
    scores = torch.randn(1, 2, 196, 197)
    token_mask = torch.zeros(1, 196, dtype=torch.bool)
    token_mask[:, :30] = True
    index = connectivity_topk(scores, 30, token_mask)
    assert (index <= 30).all()  # cls (0) or one of the 30 kept patch tokens (1..30)
    assert attention_budget(0.25, 197) == 50 and attention_budget(1.0, 197) == 197
    with pytest.raises(ValueError, match='keep rate'):
        attention_budget(0., 197)


def test_predictor_basis_and_coefficients():
    predictor = ConnectivityPredictor(head_dim=16, num_heads=3, coef_topk=8).double()
    q, k, _ = _qkv()
    approx, coef = predictor(q, k)
    assert approx.shape == (2, 3, 196, 197) and coef.shape == (2, 3, 196, 32)
    assert ((coef > 0).sum(-1) == 8).all()
    assert (predictor.basis(False) >= 0).all() and (predictor.basis(True) < 0).any()
    _, dense_coef = predictor(q, k, reconstruct=True)
    torch.testing.assert_close(dense_coef.sum(-1), torch.ones(2, 3, 196, dtype=torch.float64))
    with pytest.raises(ValueError, match='197 tokens, got 50'):
        predictor(q[:, :, :50], k[:, :, :50])


def _record_topk(monkeypatch):
    recorded = []

    def recording(*args, **kwargs):
        index = connectivity_topk(*args, **kwargs)
        recorded.append(index)
        return index
    monkeypatch.setattr(sparsifiner_module, 'connectivity_topk', recording)
    return recorded


@pytest.mark.parametrize('name', ['deit_s_reduced_keep025', 'deit_s_reduced_keep025_prune', 'lvvit_s_reduced_keep025'])
@pytest.mark.parametrize('attn_impl', ['masked', 'sparse'])
def test_official_masks_predictor_outputs_and_token_masks(monkeypatch, name, attn_impl):
    case, state, io = _case(name)
    model = _fixture_model(case, state, attn_impl=attn_impl)
    indices = _record_topk(monkeypatch)
    token_masks = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: token_masks.__setitem__(i, out[1]))
    predictor0 = model.blocks[0].attn.mask_predictor
    predictor0.register_forward_hook(lambda mod, args, out: token_masks.__setitem__('p0', out))
    with torch.no_grad():
        logits = model(io['input'])
    torch.testing.assert_close(logits, io['logits'], rtol=0, atol=case['atol'])
    approx, coef = token_masks['p0']
    torch.testing.assert_close(coef, io['basis_coef.0'], rtol=0, atol=1e-5)
    # unnormalised approximations up to ~100: fp32 rounding of the official run scales with them
    expected_approx = io['approx_attn.0']
    torch.testing.assert_close(approx, expected_approx, rtol=0, atol=1e-5 * expected_approx.abs().max().item())
    for i, index in enumerate(indices):
        mask = connectivity_mask(index, 197)
        rows = torch.ones(mask.shape[0], 197, dtype=torch.bool)
        if i > 0 and token_masks[i - 1] is not None:  # pruned query rows are tie-dependent (see the fixture notes)
            rows[:, 1:] = token_masks[i - 1]
        expected = io[f'attn_mask.{i}']
        assert torch.equal(mask.permute(0, 2, 1, 3)[rows], expected.permute(0, 2, 1, 3)[rows]), f'block {i}'
    for key in (k for k in io if k.startswith('token_mask.')):
        assert torch.equal(token_masks[int(key.split('.')[1])], io[key]), key


def test_deit_checkpoint_route_keep1_is_dense_deit(tmp_path, caplog):
    """A plain DeiT checkpoint (no predictors) loads strictly, reports the added keys, and keep 1.0 is DeiT."""
    case, state, io = _case('deit_s_reduced_keep100')
    backbone = {k: v for k, v in load_file(str(state)).items() if '.mask_predictor.' not in k}
    path = tmp_path / 'deit.safetensors'
    save_file(backbone, str(path))
    size = {k: case['zoo_kwargs'][k] for k in ('embed_dim', 'depth', 'num_heads', 'num_classes')}
    deit = timm.create_model('deit_small_patch16_224', **size).eval()
    deit.load_state_dict(backbone, strict=True)
    with caplog.at_level(logging.WARNING):
        overlay = dict(file=str(path), num_classes=size['num_classes'])
        model = timm.create_model('sparsifiner_deit_small', pretrained=True, attn_keep_rate=1.0,
                                  pretrained_cfg_overlay=overlay, **size).eval()
    assert 'initialised 24 tensors' in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), deit(io['input']), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


def test_attention_reconstruction_phase_is_dense_and_its_loss():
    torch.manual_seed(0)
    model = timm.create_model('sparsifiner_deit_small', **TINY).train()
    deit = timm.create_model('deit_small_patch16_224', **{k: v for k, v in TINY.items() if k != 'coef_topk'}).train()
    deit.load_state_dict({k: v for k, v in model.state_dict().items() if '.mask_predictor.' not in k})
    x = torch.randn(2, 3, 224, 224)
    model.set_attention_reconstruction(True)
    with AttentionRecorder(deit) as maps:
        torch.testing.assert_close(model(x), deit(x))
    assert len(model.approx_attn) == 2 and len(maps) == 2
    expected = torch.stack([(a - m[:, :, 1:]).square().sum() for a, m in zip(model.approx_attn, maps)]).mean()
    torch.testing.assert_close(model.teacher_attention_loss(maps), expected)
    model.set_attention_reconstruction(False)
    assert not torch.allclose(model(x), deit(x))  # phase 2: the mask is on in training mode


def test_attention_recorder_matches_timm_probabilities():
    torch.manual_seed(0)
    vit = timm.create_model('deit_small_patch16_224', embed_dim=32, depth=2, num_heads=2).eval()
    seen = []
    for block in vit.blocks:
        block.attn.fused_attn = False  # the unfused path passes the probabilities through attn_drop
        block.attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(out))
    with AttentionRecorder(vit) as maps, torch.no_grad():
        vit(torch.randn(1, 3, 224, 224))
    for got, expected in zip(maps, seen):
        torch.testing.assert_close(got, expected)


def test_distill_losses():
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    p_t = teacher.softmax(-1)
    expected = (p_t * (p_t.log() - student.log_softmax(-1))).sum() / 4
    torch.testing.assert_close(kl_to_teacher(student, teacher), expected)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(patch_token_mse(a, b), (a[:, 1:] - b[:, 1:]).square().mean())
    with pytest.raises(ValueError, match='differ'):
        patch_token_mse(a, b[:, :4])
    with pytest.raises(ValueError, match="unknown key.*'weight'"):
        DistillConfig.from_dict({'teacher': 'x', 'weight': 1})


def test_phase1_trains_only_the_predictors():
    torch.manual_seed(0)
    model = timm.create_model('sparsifiner_deit_small', **TINY).train()
    teacher = timm.create_model('deit_small_patch16_224', embed_dim=32, depth=2, num_heads=2, num_classes=5)
    config = DistillConfig(teacher='deit_small_patch16_224', cls_weight=0., kl_weight=0., token_weight=0.,
                           attn_weight=0.01, trainable=['blocks.*.attn.mask_predictor.*'])
    distill = DistillLoss(config, torch.nn.CrossEntropyLoss(), teacher=teacher).train()
    names = distill.prepare_student(model)
    assert names == model.predictor_parameter_names() and not teacher.training
    loss, parts = distill(model, torch.randn(2, 3, 224, 224), torch.tensor([0, 1]))
    assert set(parts) == {'attn'}
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(names)
    with pytest.raises(ValueError, match='matches no parameter'):
        set_trainable(model, ['blocks.*.attn.predictor.*'])


def test_predictors_train_only_while_fitted_to_the_teacher():
    """The task loss never reaches the predictors (detached mask), so they are frozen by default and a plain step
    leaves no trainable parameter without gradient; attention reconstruction (phase 1) unfreezes them, and a
    distillation without it keeps them frozen even when no trainable / frozen pattern is given."""
    torch.manual_seed(0)
    model = timm.create_model('sparsifiner_deit_small', **TINY).train()
    predictors = set(model.predictor_parameter_names())
    params = dict(model.named_parameters())
    assert len(predictors) == 12 and not any(params[n].requires_grad for n in predictors)
    model.set_attention_reconstruction(True)
    assert all(params[n].requires_grad for n in predictors)
    teacher = timm.create_model('deit_small_patch16_224', embed_dim=32, depth=2, num_heads=2, num_classes=5)
    distill = DistillLoss(DistillConfig(teacher='deit_small_patch16_224'), torch.nn.CrossEntropyLoss(),
                          teacher=teacher).train()
    names = distill.prepare_student(model)
    assert set(names) == set(params) - predictors
    loss, parts = distill(model, torch.randn(2, 3, 224, 224), torch.tensor([0, 1]))
    assert set(parts) == {'cls', 'kl', 'token'}
    loss.backward()
    assert {n for n, p in params.items() if p.grad is not None} == set(names)


@pytest.mark.parametrize('path', sorted((REPO / 'recipes' / 'classification' / 'sparsifiner').glob('*.yaml')),
                         ids=lambda p: p.name)
def test_phase_recipes_validate(path):
    recipe = load_recipe(path)
    phases = phase_recipes(recipe)
    assert len(phases) == 2
    first, second = (DistillConfig.from_dict(p.loss.distill) for p in phases)
    assert first.attn_weight == 0.01 and first.cls_weight == 0 and first.trainable
    assert (second.cls_weight, second.kl_weight, second.token_weight, second.attn_weight) == (1., .5, .5, 0.)
    assert second.frozen == first.trainable


def test_quickstart_phases_train_end_to_end(tmp_path):
    teacher = timm.create_model('deit_small_patch16_224', embed_dim=32, depth=2, num_heads=2, num_classes=10)
    save_file(teacher.state_dict(), str(tmp_path / 'teacher.safetensors'))
    ckpt = str(tmp_path / 'teacher.safetensors')
    recipe = load_recipe(REPO / 'recipes/classification/sparsifiner/sparsifiner_quickstart.yaml',
                         [f'model.checkpoint={ckpt}', f'loss.distill.checkpoint={ckpt}'])
    metrics = classification.train(recipe, str(tmp_path / 'run'))
    assert len(metrics['phases']) == 2
    phase1 = load_file(str(tmp_path / 'run/phase1/model/model.safetensors'))
    phase2 = load_file(str(tmp_path / 'run/phase2/model/model.safetensors'))
    start = teacher.state_dict()
    # phase 1 moved only predictors; phase 2 only the backbone
    assert torch.equal(phase1['blocks.0.attn.qkv.weight'], start['blocks.0.attn.qkv.weight'])
    assert torch.equal(phase2['blocks.0.attn.mask_predictor.proj_n'], phase1['blocks.0.attn.mask_predictor.proj_n'])
    assert not torch.equal(phase2['blocks.0.attn.qkv.weight'], start['blocks.0.attn.qkv.weight'])


def test_sparse_execution_has_fewer_attention_macs():
    x = torch.randn(1, 3, 224, 224)
    macs = {}
    for impl, keep in [('masked', 1.0), ('masked', 0.25), ('sparse', 0.25)]:
        torch.manual_seed(0)
        model = timm.create_model('sparsifiner_deit_small', **dict(TINY, attn_keep_rate=keep, attn_impl=impl)).eval()
        macs[impl, keep] = count_macs(model, x)
    # analytic attention MACs per block (QK^T and AV): masked N^2 pairs, sparse (N - 1) * budget + N (cls row)
    heads, head_dim, tokens, budget, depth = 2, 16, 197, 50, 2
    saved = depth * 2 * heads * head_dim * (tokens * tokens - ((tokens - 1) * budget + tokens))
    assert macs['masked', 0.25] - macs['sparse', 0.25] == saved
    assert macs['masked', 0.25] > macs['masked', 1.0]  # the official masked path adds the predictor to dense work
    assert resolve_attn_impl('auto', 0.25, torch.device('cpu')) == 'masked'  # measured faster on CPU (RESULTS.md)
    assert resolve_attn_impl('sparse', 0.25, torch.device('cpu')) == 'sparse'


@pytest.mark.parametrize('shape,dtype,message', [
    ((1, 3, 192, 192), torch.float32, r'needs 224x224 inputs.*197 tokens.*got 192x192'),
    ((1, 1, 224, 224), torch.float32, r'built for 3 input channels, got 1'),
    ((1, 3, 224, 224), torch.uint8, r'floating-point'),
    ((3, 224, 224), torch.float32, r'\(B, 3, H, W\) image tensor'),
])
def test_bad_inputs_raise_one_clear_error(shape, dtype, message):
    model = timm.create_model('sparsifiner_deit_small', **TINY).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape, dtype=dtype))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        timm.create_model('sparsifiner_deit_small', attn_impl='fast', **TINY)
    with pytest.raises(ValueError, match='attn_keep_rate_list has 3 entries for depth 2'):
        timm.create_model('sparsifiner_deit_small', attn_keep_rate_list=[1, 1, 1], **TINY)
    with pytest.raises(ValueError, match='coef_topk=40 exceeds the 32 basis tokens'):
        timm.create_model('sparsifiner_deit_small', **dict(TINY, coef_topk=40))
