"""MoH-ViT (mixture-of-heads TransNeXt) beyond the shared contract and the parity cases of test_parity: the fixtures'
per-layer gates, the routed execution, the load-balancing loss, invalid head splits, official training checkpoints
and the training task's auxiliary term."""
import argparse
import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import REPO, fixtures_path, fixtures_root
from zoo.bench import count_macs, count_routed_macs
from zoo.layers.aggregated_attn import AggregatedAttention, ScaledCosineAttention
from zoo.layers.kernels.dispatch import Call, select
from zoo.layers.mixture_of_heads import load_balancing_loss, mixture_of_heads_gates, routed_token_index
from zoo.models import read_state_dict
from zoo.models.transnext import TransNeXt
from zoo.recipes import read_recipe_tree
from zoo.tasks import classification, load_recipe

CASES = sorted(p for p in (fixtures_path() / 'moh').glob('*.json') if not p.name.startswith('keys_'))
TINY = dict(embed_dims=(24, 48, 72, 96), num_heads=(2, 2, 3, 4), depths=(1, 1, 1, 1), shared_head=(2, 1, 1, 0),
            routed_head=(0, 1, 1, 2), img_size=64, num_classes=10, drop_path_rate=0.)
ROUTED_LAYERS = ['block2.0', 'block3.0', 'block4.0']  # the TINY stages with routed_head > 0


def _fixture_model(path: Path, **kwargs):
    fixtures_root()
    case = json.loads(path.read_text())
    state = path.parent / case['files']['state']
    model = timm.create_model(case['zoo_name'], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(state), num_classes=case['zoo_kwargs']['num_classes']), **case['zoo_kwargs'], **kwargs).eval()
    return case, model, load_file(str(path.parent / case['files']['io']))


def _record_gates(model):
    """{'{stage}.{block}': HeadGates} of every attention layer's next call (1-based stage, as the fixtures)."""
    seen = {}
    for name, module in model.named_modules():
        if name.endswith('.attn'):
            stage, block = name.split('.')[:2]
            key = f'{stage[len("block"):]}.{block}'
            module.register_forward_pre_hook(
                lambda mod, args, key=key: seen.__setitem__(key, mod.head_gates(args[0].flatten(1, 2))))
    return seen


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_gates_and_routes_are_the_official_ones(path):
    case, model, io = _fixture_model(path)
    seen = _record_gates(model)
    with torch.no_grad():
        model(io['input'])
    for key, gating in seen.items():
        torch.testing.assert_close(gating.gates, io[f'head_gates.{key}'], rtol=0, atol=1e-4, msg=key)
        if f'route_mask.{key}' in io:
            assert torch.equal(gating.routed_mask, io[f'route_mask.{key}']), key
        else:
            assert gating.routed_mask is None, key


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_routed_execution_gives_the_official_logits(path):
    """Each routed head computed only for the tokens that selected it: the official logits within atol."""
    case, model, io = _fixture_model(path, moh_backend='routed')
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


@pytest.mark.parametrize('attention', ['aggregated', 'full'])
def test_routed_and_masked_executions_agree_with_gradients(attention):
    torch.manual_seed(0)
    args = dict(shared_head=1, routed_head=2, attn_drop=0.)
    if attention == 'aggregated':
        masked = AggregatedAttention(32, 4, (8, 8), sr_ratio=2, moh_backend='torch', **args)
    else:
        masked = ScaledCosineAttention(32, 4, (4, 4), moh_backend='torch', **args)
    routed = type(masked)(**{**_init_args(masked), 'moh_backend': 'routed'})
    routed.load_state_dict(masked.state_dict())
    x = torch.randn(2, 8, 6, 32, requires_grad=True)
    out_masked = masked(x)
    grad_masked, = torch.autograd.grad(out_masked.square().sum(), x)
    out_routed = routed(x)
    grad_routed, = torch.autograd.grad(out_routed.square().sum(), x)
    torch.testing.assert_close(out_routed, out_masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_routed, grad_masked, rtol=1e-4, atol=1e-4)


def _init_args(module):
    common = dict(dim=module.dim, num_heads=module.num_heads, pretrain_size=module.pretrain_size,
                  shared_head=module.shared_head, routed_head=module.routed_head)
    if isinstance(module, AggregatedAttention):
        common.update(sr_ratio=module.sr_ratio)
    return common


def test_auto_runs_the_masked_execution_until_routed_is_measured_faster():
    """benchmarks/RESULTS.md "MoH": routed was slower for both whole models on CPU; no GPU figures yet."""
    for device in ('cpu', 'cuda'):
        call = Call(torch.device(device), torch.float32, (8, 14, 14, 384))
        assert select('moh_heads', call) == 'torch'
    with pytest.raises(ValueError, match="moh_backend must be one of .*'routed'"):
        AggregatedAttention(32, 4, (8, 8), shared_head=1, routed_head=2, moh_backend='sparse')


def test_routed_token_index_packs_each_heads_tokens():
    mask = torch.tensor([[[True, False], [False, False], [True, True]]])     # (B=1, N=3, E=2)
    index, valid = routed_token_index(mask)
    assert index.shape == valid.shape == (1, 2, 2)
    assert index[0, 0].tolist() == [0, 2] and valid[0, 0].tolist() == [True, True]
    assert index[0, 1, 0].item() == 2 and valid[0, 1].tolist() == [True, False]


def test_gating_rules_from_the_paper():
    """Uniform routers give every active head weight 1; a top-k of k routes every head (plain softmax x k)."""
    x = torch.randn(2, 5, 8)
    uniform = mixture_of_heads_gates(x, _zero_router(4), _zero_router(2), _zero_router(2), shared_head=2,
                                     routed_head=2)
    assert uniform.routed_mask.sum(-1).eq(2).all()
    active = torch.cat([torch.ones(2, 5, 2, dtype=torch.bool), uniform.routed_mask], -1)
    torch.testing.assert_close(uniform.gates, active.float())
    wg = torch.nn.Linear(8, 3, bias=False)
    every = mixture_of_heads_gates(x, wg, None, None, shared_head=0, routed_head=3)
    torch.testing.assert_close(every.gates, wg(x).softmax(-1) * 3)


def _zero_router(outputs: int) -> torch.nn.Linear:
    router = torch.nn.Linear(8, outputs, bias=False)
    torch.nn.init.zeros_(router.weight)
    return router


def test_load_balancing_loss_matches_its_definition():
    """E * sum_e mean(p_e) * (share of tokens choosing e), looped token by token; k when balanced, E when k = E."""
    torch.manual_seed(1)
    probs = torch.randn(2, 7, 4).softmax(-1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(2, -1).indices, True)
    tokens = [(b, n) for b in range(2) for n in range(7)]
    me = [sum(probs[b, n, e].item() for b, n in tokens) / len(tokens) for e in range(4)]
    ce = [sum(mask[b, n, e].item() for b, n in tokens) / len(tokens) for e in range(4)]
    expected = 4 * sum(m * c for m, c in zip(me, ce))
    assert load_balancing_loss(probs, mask).item() == pytest.approx(expected, rel=1e-6)
    assert load_balancing_loss(torch.full((1, 4, 2), 0.5), torch.ones(1, 4, 2, dtype=torch.bool)).item() == 2.0


def test_forward_with_aux_averages_the_routed_layers_per_model():
    torch.manual_seed(0)
    model = timm.create_model('moh_transnext_base_50', **TINY).train()
    other = timm.create_model('moh_transnext_base_50', **TINY).train()
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # repeated passes replace, never accumulate
        logits, aux = model.forward_with_aux(x)
    losses = model.load_balancing_losses()
    assert sorted(losses) == ROUTED_LAYERS
    torch.testing.assert_close(aux, torch.stack(list(losses.values())).mean())
    other(x)
    assert model.load_balancing_losses().keys() == losses.keys()  # another instance adds nothing here
    assert copy.deepcopy(model).load_balancing_losses() == {}  # an EMA copy starts without the graph
    assert logits.shape == (2, 10) and aux.dim() == 0
    aux.backward()
    assert model.block3[0].attn.wg.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.load_balancing_losses() == {}
    with pytest.raises(ValueError, match='training mode only'):
        model.forward_with_aux(x)
    with pytest.raises(ValueError, match='no mixture-of-heads layers'):
        timm.create_model('transnext_micro', embed_dims=(24, 48, 72, 96), num_heads=(1, 2, 3, 4),
                          depths=(1, 1, 1, 1)).forward_with_aux(x)


@pytest.mark.parametrize('shared,routed,message', [
    ((2, 2, 3, 2), (0, 0, 0, 0), r'routed_head 0 with shared_head 2 < num_heads 4'),   # official einsum crash
    ((2, 2, 3, 0), (0, 0, 0, 0), r'routed_head 0 with shared_head 0 < num_heads 4'),   # official: no wg_1
    ((2, 2, 3, 1), (0, 0, 0, 4), r'routed_head 4 \(the top-k count\) exceeds the routed pool'),  # topk out of range
    ((2, 2, 3, 4), (0, 0, 0, 1), r'routed_head 1 \(the top-k count\) exceeds the routed pool .* = 0'),
    ((2, 2, 3, 5), (0, 0, 0, 0), r'shared_head 5 exceeds num_heads 4'),
    ((2, 2, 3), (0, 0, 0), r'shared_head has 3 entries but the model has 4 stages'),
])
def test_splits_the_official_code_crashes_on_are_clear_errors(shared, routed, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('moh_transnext_base_50', **dict(TINY, shared_head=shared, routed_head=routed))


def test_routing_without_shared_heads_given_is_a_clear_error():
    """timm drops None keyword arguments, so the factories cannot turn MoH off; the class can."""
    kwargs = {k: v for k, v in TINY.items() if k not in ('shared_head', 'routed_head')}
    with pytest.raises(ValueError, match='needs shared_head'):
        TransNeXt(routed_head=(0, 0, 0, 1), **kwargs)


def test_one_shared_head_without_routing_is_plain_attention():
    """S = h = 1 with k = 0 (the official constructor defaults, which crash there): the gate is the constant 1."""
    torch.manual_seed(0)
    plain = AggregatedAttention(24, 1, (8, 8), sr_ratio=2)
    gated = AggregatedAttention(24, 1, (8, 8), sr_ratio=2, shared_head=1, routed_head=0)
    gated.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 8, 24)
    torch.testing.assert_close(gated(x), plain(x), rtol=0, atol=0)


def test_official_training_checkpoint_loads_without_unpickling_code(tmp_path):
    """The hub files are training checkpoints (weights under 'model', optimizer state, an argparse.Namespace)."""
    torch.manual_seed(0)
    source = timm.create_model('moh_transnext_base_50', **TINY)
    optimizer = torch.optim.AdamW(source.parameters())
    source(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    path = tmp_path / 'moh_transnext_base_50.pth'
    torch.save({'model': source.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 299,
                'args': argparse.Namespace(model='moh_transnext_base_50', lr=1e-3), 'max_accuracy': 84.7}, path)
    loaded = timm.create_model('moh_transnext_base_50', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    assert read_state_dict(path).keys() == source.state_dict().keys()

    hostile = tmp_path / 'hostile.pth'
    torch.save({'model': source.state_dict(), 'args': _NotAllowed()}, hostile)
    with pytest.raises(ValueError, match='pickled objects that weights_only loading refuses'):
        read_state_dict(hostile)
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        timm.create_model('moh_transnext_base_50', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(hostile), num_classes=10), **TINY)


class _NotAllowed:
    """A class no weights-only loader may build."""


def test_classification_task_adds_the_weighted_balancing_loss(tmp_path):
    path = tmp_path / 'moh_tiny.yaml'
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items() if k not in ('num_classes',)}
    path.write_text('task: classification\nsource: test\n'
                    f'model: {json.dumps(dict(name="moh_transnext_base_50", **kwargs))}\n'
                    'data: {name: shapes, img_size: 64}\nloss: {aux_weight: 0.01}\n')
    module = classification.ClassificationModule(load_recipe(path), num_classes=10)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss, _ = module._training_loss(images, labels)
    logits = module.model(images)
    aux = torch.stack(list(module.model.load_balancing_losses().values())).mean()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + 0.01 * aux)


RECIPES = sorted((REPO / 'recipes' / 'classification' / 'moh').glob('moh_*.yaml'))


def test_recipes_cover_every_variant_with_the_official_balancing_weight():
    """The merged recipe trees (tests/tasks/test_recipes.py validates every recipe in full)."""
    trees = [read_recipe_tree(p)[0] for p in RECIPES]
    assert sorted(t['model']['name'] for t in trees) == zoo.list_models('moh_transnext_*')
    for tree in trees:
        assert tree['loss']['aux_weight'] == 0.01
        assert tree['model']['drop_path_rate'] == (0.45 if 'small' in tree['model']['name'] else 0.6)


def test_bench_counts_routed_macs_less_the_unselected_heads_attention():
    """TINY at 64: stage 3 (4x4 map, 2x2 pooled keys, d 24) skips 1 of its 2 routed heads per token, stage 4 (2x2
    map, full attention, d 24) 2 of 4; a skipped pair saves window q.k + attn.v + learnable tokens (3 * 9 d) and
    pooled q.k + attn.v (2 * 4 d), resp. q.k + attn.v over 4 keys (2 * 4 d)."""
    model = timm.create_model('moh_transnext_base_50', **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    skipped = 16 * 1 * 24 * (3 * 9 + 2 * 4) + 4 * 2 * 24 * (2 * 4)
    assert count_macs(model, x) - count_routed_macs(model, x) == skipped
