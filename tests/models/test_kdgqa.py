"""KDGQA family: MHA -> GQA conversion, allocation rules, and the default mode's fixes of the official defects.

Fixture-backed tests use ../shared/fixtures/kdgqa (official modules, see its JSON notes); the others build tiny
models. Expected values are computed independently (naive loops, timm's own ViT, F.scaled_dot_product_attention).
"""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_root
from zoo.layers.grouped_query_attn import (GroupedQueryAttention, convert_mha_to_gqa, grouped_query_attention,
                                           kdgqa_allocation, kv_head_index, pgqa_perturb, repair_allocation)

TINY = dict(embed_dim=32, depth=2, num_heads=4, num_kv_heads=2)


def _case(name: str):
    folder = fixtures_root() / 'kdgqa'
    case = json.loads((folder / f'{name}.json').read_text())
    return folder, case, load_file(str(folder / case['files']['io']))


def _fixture_model(name: str, **overrides):
    """The case's model through the user path, with zoo_kwargs overridden (e.g. mode='default')."""
    folder, case, io = _case(name)
    kwargs = {**case['zoo_kwargs'], **overrides}
    model = timm.create_model(case['zoo_name'], pretrained=True, **kwargs, pretrained_cfg_overlay=dict(
        file=str(folder / case['files']['state']), num_classes=kwargs['num_classes'])).eval()
    return model, io, case


def _naive_repair(alloc, total):
    """The official repair, written as its loops."""
    alloc = list(alloc)
    while sum(alloc) > total:
        alloc[alloc.index(max(alloc))] -= 1
    while sum(alloc) < total:
        alloc[alloc.index(min(alloc))] += 1
    return alloc


# ---------------------------------------------------------------- conversion

def test_convert_mha_to_gqa_reproduces_the_official_conversion():
    folder, case, _ = _case('gqa_e96_kv3')
    source = load_file(str(folder / case['files']['mha_source']))
    expected = load_file(str(folder / case['files']['state']))
    converted = convert_mha_to_gqa(source, num_heads=6, num_kv_heads=3)
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert 'blocks.0.attn.qkv.weight' in source  # the input is left alone


def test_convert_reset_final_norm_flag_reproduces_the_official_loader():
    folder, case, _ = _case('gqa_e96_kv3')
    source = load_file(str(folder / case['files']['mha_source']))
    converted = convert_mha_to_gqa(source, 6, 3, reset_final_norm=True)
    assert torch.equal(converted['norm.weight'], torch.ones(96))
    assert torch.equal(converted['norm.bias'], torch.zeros(96))


def test_timm_mha_checkpoint_loads_through_the_user_path_as_gqa():
    """pretrained_cfg_overlay(file=<timm MHA ViT>) converts on load and gives the official GQA logits."""
    folder, case, io = _case('gqa_e96_kv3')
    model = timm.create_model(case['zoo_name'], pretrained=True, **case['zoo_kwargs'], pretrained_cfg_overlay=dict(
        file=str(folder / case['files']['mha_source']), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


def test_gqa_with_as_many_kv_heads_as_heads_is_timm_mha():
    """Anchor: mean-pooling groups of one head is the identity, so GQA(kv = H) equals timm's own ViT."""
    folder, case, io = _case('gqa_e96_kv3')
    source = load_file(str(folder / case['files']['mha_source']))
    reference = timm.create_model('vit_small_patch16_224', embed_dim=96, depth=2, num_heads=6, num_classes=10)
    reference.load_state_dict(source)
    source_file = str(folder / case['files']['mha_source'])
    model = timm.create_model('vit_small_patch16_224_gqa', pretrained=True, embed_dim=96, depth=2, num_heads=6,
                              num_kv_heads=6, pretrained_cfg_overlay=dict(file=source_file))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io['input']), reference.eval()(io['input']), rtol=0, atol=1e-5)


def test_timm_checkpoint_of_another_grid_is_resampled():
    """A 224 (14x14 grid) checkpoint into a 160 model: the patch part of the position embedding is resampled
    bicubically (antialiased, timm's convention), the cls entry kept, and the model then gives timm's own ViT's
    logits (kv heads = heads, so GQA is MHA) at 160."""
    folder, case, io = _case('gqa_e96_kv3')
    source = load_file(str(folder / case['files']['mha_source']))
    overlay = dict(file=str(folder / case['files']['mha_source']), num_classes=10)
    model = timm.create_model('vit_small_patch16_224_gqa', pretrained=True, embed_dim=96, depth=2, num_heads=6,
                              num_kv_heads=6, img_size=160, num_classes=10, pretrained_cfg_overlay=overlay)
    pos = source['pos_embed']
    grid = pos[:, 1:].reshape(1, 14, 14, 96).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(10, 10), mode='bicubic', align_corners=False, antialias=True)
    expected = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 100, 96)], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    reference = timm.create_model('vit_small_patch16_224', embed_dim=96, depth=2, num_heads=6, num_classes=10,
                                  img_size=160).eval()
    reference.load_state_dict({**source, 'pos_embed': expected})
    x = F.interpolate(io['input'], size=(160, 160), mode='bilinear', align_corners=False)
    with torch.no_grad():
        expected_logits = reference(x)
        torch.testing.assert_close(model.eval()(x), expected_logits, rtol=0,
                                   atol=1e-5 * expected_logits.abs().max().item())


def test_timm_in1k_head_is_replaced_for_the_10_class_default():
    """A 1000-class timm checkpoint into the official 10-class model: body converted, fresh head kept."""
    source = timm.create_model('vit_small_patch16_224', embed_dim=32, depth=1, num_heads=4).state_dict()
    model = timm.create_model('vit_small_patch16_224_gqa', embed_dim=32, depth=1, num_heads=4, num_kv_heads=2)
    filtered = zoo.models.kdgqa.checkpoint_filter_fn(source, model)
    model.load_state_dict(filtered, strict=True)
    assert model.head.weight.shape == (10, 32)


def test_dgqa_diff_loads_the_dgqa_manifest_strictly():
    """dgqa_diff has the dgqa_ema keys (the official note); its model must load that manifest."""
    data = json.loads((fixtures_root() / 'kdgqa' / 'keys_vit_small_patch16_224_dgqa_ema.json').read_text())
    with torch.device('meta'):
        model = timm.create_model('vit_small_patch16_224_dgqa_diff', **data['zoo_kwargs'])
    state = {k: torch.empty(shape, device='meta') for k, shape in data['keys'].items()}
    model.load_state_dict(zoo.models.kdgqa.checkpoint_filter_fn(state, model), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == data['num_params']


# ---------------------------------------------------------------- operator and allocation rules

def test_grouped_query_attention_equals_sdpa_with_repeated_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(grouped_query_attention(q, k, v), expected)
    index = torch.tensor([[0, 0, 0, 0, 2, 2], [1, 1, 1, 1, 1, 2]])
    gathered = [F.scaled_dot_product_attention(q[b], k[b, index[b]], v[b, index[b]]) for b in range(2)]
    torch.testing.assert_close(grouped_query_attention(q, k, v, index), torch.stack(gathered))


def test_sdpa_backend_matches_the_reference():
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_224_kdgqa', **TINY).eval()
    fused = timm.create_model('vit_small_patch16_224_kdgqa', attn_backend='sdpa', **TINY).eval()
    fused.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_kv_head_index_is_consecutive_chunks():
    assert kv_head_index(torch.tensor([4, 2, 0]), 6).tolist() == [0, 0, 0, 0, 1, 1]
    assert kv_head_index(torch.tensor([0, 5, 1]), 6).tolist() == [1, 1, 1, 1, 1, 2]


def test_repair_allocation_is_the_official_loop():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        groups = int(torch.randint(2, 7, (1,), generator=generator))
        heads = groups * int(torch.randint(1, 5, (1,), generator=generator))
        alloc = torch.randint(0, heads, (groups,), generator=generator)
        alloc = alloc * heads // max(1, int(alloc.sum()))  # near a sum of H, as rounding leaves it
        assert repair_allocation(alloc, heads).tolist() == _naive_repair(alloc.tolist(), heads)


@pytest.mark.parametrize('layer', [0, 1])
@pytest.mark.parametrize('name', ['kdgqa_e96_kv3_b1', 'kdgqa_e96_kv3_b2'])
def test_kdgqa_allocation_from_the_official_norms(name, layer):
    _, _, io = _case(name)
    assert kdgqa_allocation(io[f'k_norms.{layer}'], 6).tolist() == io[f'q_alloc.{layer}'].tolist()


def test_equal_key_norms_give_the_uniform_allocation_without_nan():
    """The official min-max gives 0/0 = NaN and a ~2**31-step repair loop; the guard returns where it ends."""
    assert kdgqa_allocation(torch.full((3,), 2.5), 6).tolist() == [2, 2, 2]
    assert kdgqa_allocation(torch.zeros(2, 4), 12, min_queries=1).tolist() == [[3, 3, 3, 3]] * 2
    for mode in ('official', 'default'):
        attn = GroupedQueryAttention(16, 4, 2, scheme='kdgqa', mode=mode).eval()
        torch.nn.init.zeros_(attn.k.weight), torch.nn.init.zeros_(attn.k.bias)  # every key head has norm 0
        out = attn(torch.randn(2, 5, 16))
        rows = 2 if mode == 'default' else 1  # per sample, or one allocation for the batch
        assert torch.isfinite(out).all() and attn.last_allocation.flatten().tolist() == [2, 2] * rows


def test_no_kv_head_is_left_without_queries_unless_asked():
    norms = torch.tensor([1.0, 3.0])  # min-max makes the first 0: the official split is (0, H), i.e. MQA
    assert kdgqa_allocation(norms, 12).tolist() == [0, 12]
    assert kdgqa_allocation(norms, 12, min_queries=1).tolist() == [1, 11]
    assert kdgqa_allocation(torch.tensor([1.0, 5.0, 2.0, 9.0]), 8, min_queries=2).tolist() == [2, 2, 2, 2]
    attn = GroupedQueryAttention(16, 4, 2, scheme='kdgqa').eval()
    attn(torch.randn(3, 5, 16))
    assert (attn.last_allocation >= 1).all()


# ---------------------------------------------------------------- default mode vs official defects

def test_kdgqa_default_mode_is_batch_independent():
    model, io, _ = _fixture_model('kdgqa_e96_kv3_b2', mode='default')
    official, _, _ = _fixture_model('kdgqa_e96_kv3_b2')
    x = io['input']
    with torch.no_grad():
        batched, single = model(x), model(x[:1])
        torch.testing.assert_close(batched[:1], single, rtol=0, atol=1e-5)
        # the official mode shares one allocation across the batch (the documented coupling)
        assert (official(x)[:1] - official(x[:1])).abs().max() > 0.1


def test_kdgqa_default_mode_without_floor_is_the_official_rule_per_sample():
    """On one sample and with empty groups allowed, the default mode computes exactly the official allocation."""
    model, _, _ = _fixture_model('kdgqa_e96_kv3_b1', mode='default', min_queries_per_kv_head=0)
    _, case, io = _case('kdgqa_e96_kv3_b1')
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


def test_dgqa_official_eval_is_stateful_and_overwrites_the_cache():
    """Official DGQA eval allocates from this batch's key norms and the cache, then stores those norms in the cache:
    a second call on the same input allocates, and answers, as the official second call did (the fixture stores
    the cache after the first call only)."""
    model, io, case = _fixture_model('dgqa_ema_e96_kv3_b2')
    for suffix in ('', '_call2'):
        torch.manual_seed(case['rng_seed_before_forward'])
        with torch.no_grad():
            logits = model(io['input'])
        torch.testing.assert_close(logits, io[f'logits{suffix}'], rtol=0, atol=case['atol'], msg=f'logits{suffix}')
        for i, block in enumerate(model.blocks):
            assert block.attn.last_allocation.flatten().tolist() == io[f'q_alloc{suffix}.{i}'].tolist(), (suffix, i)
            if not suffix:
                torch.testing.assert_close(block.attn.cache, io[f'cache_after.{i}'], rtol=1e-6, atol=1e-5)


def test_dgqa_default_eval_is_frozen_deterministic_and_batch_independent():
    model, io, _ = _fixture_model('dgqa_ema_e96_kv3_b2', mode='default')
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = io['input']
    with torch.no_grad():
        first, second, single = model(x), model(x), model(x[1:])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[1:], single, rtol=0, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f'{key} changed in eval'
    assert 'blocks.0.attn.cache' in state and 'blocks.0.attn.splits' in state


@pytest.mark.parametrize('scheme', ['dgqa_ema', 'dgqa_diff'])
def test_dgqa_training_updates_on_the_window_and_the_state_round_trips(scheme, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(f'vit_small_patch16_224_{scheme}', window_size=2, **TINY)
    attn = model.blocks[0].attn
    caches = []
    for _ in range(3):
        model.train()(torch.randn(2, 3, 32, 32))
        caches.append(attn.cache.clone())
    assert attn.training_step == 3
    assert not torch.equal(caches[0], torch.zeros(2)) and torch.equal(caches[1], caches[0])  # step 1: no update
    assert not torch.equal(caches[2], caches[1])  # step 2: update
    assert int(attn.splits.sum()) == 4 and (attn.splits >= 1).all()
    reloaded = timm.create_model(f'vit_small_patch16_224_{scheme}', window_size=2, **TINY)
    reloaded.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('scheme', ['dgqa_ema', 'dgqa_diff'])
def test_dgqa_training_state_does_not_depend_on_grad_checkpointing(scheme):
    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(f'vit_small_patch16_224_{scheme}', window_size=2, **TINY).train()
        model.set_grad_checkpointing(checkpointing)
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        attn = model.blocks[0].attn
        states.append((attn.training_step, attn.cache.clone(), attn.splits.clone()))
    (steps, cache, splits), (steps_ckpt, cache_ckpt, splits_ckpt) = states
    assert steps_ckpt == steps == 3
    torch.testing.assert_close(cache_ckpt, cache)
    assert torch.equal(splits_ckpt, splits)


def test_pgqa_default_mode_adds_noise_only_in_training_from_torch_rng():
    torch.manual_seed(0)
    pgqa = timm.create_model('vit_small_patch16_224_pgqa', **TINY)
    gqa = timm.create_model('vit_small_patch16_224_gqa', **TINY)
    gqa.load_state_dict(pgqa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pgqa.eval()(x), gqa.eval()(x), rtol=0, atol=0)
        pgqa.train()
        torch.manual_seed(5)
        first = pgqa(x)
        torch.manual_seed(5)
        again = pgqa(x)
        other = pgqa(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-3 and (first - gqa.train()(x)).abs().max() > 1e-3


def test_pgqa_official_mode_is_stochastic_in_eval():
    model, io, _ = _fixture_model('pgqa_e96_kv3_b2')
    with torch.no_grad():
        assert (model(io['input']) - model(io['input'])).abs().max() > 1e-3


def test_pgqa_perturb_matches_a_row_by_row_loop():
    torch.manual_seed(0)
    out, noise = torch.randn(2, 6, 5, 4), torch.rand(3, 2, 20)
    expected = out.clone().reshape(2, 6, 20)
    for g in range(3):
        block = noise[g].clone()
        block[0, 0] = block[1, 1] = 0
        for i in range(2):
            z = (block[i] - block[i].mean()) / block[i].std()
            for b in range(2):
                row = out.reshape(2, 6, 20)[b, 2 * g + i]
                expected[b, 2 * g + i] = row - (z * row.std() + row.mean())
    torch.testing.assert_close(pgqa_perturb(out, noise), expected.view_as(out))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('x,match', [
    (torch.randn(3, 64, 64), r'\(B, 3, H, W\)'),
    (torch.randn(1, 1, 64, 64), 'input channels'),
    (torch.randn(1, 3, 64, 70), 'multiples of the patch size'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 'floating-point'),
])
def test_bad_input_raises_a_clear_value_error(x, match):
    model = timm.create_model('vit_small_patch16_224_kdgqa', **TINY).eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_fixed_size_model_names_its_size():
    model = timm.create_model('vit_small_patch16_224_gqa', dynamic_img_size=False, img_size=64, **TINY).eval()
    with pytest.raises(ValueError, match='built for 64x64'):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_kv_heads=3), 'num_kv_heads must divide'),
    (dict(att_scheme='mqa'), 'att_scheme must be one of'),
    (dict(mode='faithful'), 'mode must be one of'),
    (dict(min_queries_per_kv_head=3), 'min_queries_per_kv_head'),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('vit_small_patch16_224_kdgqa', **{**TINY, **kwargs})
