"""Graph capture of every family on CPU, tiny configs: torch.compile(fullgraph=True), torch.jit.trace, torch.export
with dynamic H and W (the families that take any size), and ONNX through the dynamo exporter, run with onnx's
reference evaluator against eager.

What made capture fail before, and stays checked here: index tables built in numpy (dynamo cannot trace them, and
with a symbolic size there is no number to build them from; zoo.layers.window_geometry and TransNeXt's
zoo.layers.aggregated_attn now build them in the graph, the CPB offsets without numpy's `unique`), `searchsorted`
(no ONNX op), scatter of a bool scalar (torch.jit.trace), `round()` or `math.log` of a traced size.

Cost: each capture of a tiny model takes seconds on a shared 2-core CPU, so the default run keeps one model per
family for compile and trace and one ONNX export; the ONNX export of every family and the dynamic-shape exports
(tens of seconds each) are `heavy` (`pytest -m heavy`).
"""
import warnings
from typing import Optional

import pytest
import timm
import torch

import zoo
from conftest import require
from tiny_configs import tiny_kwargs

# family -> (model, overrides on top of its tiny config, input size). OverLoCK's kernels shrink to 5 (ContMix
# small kernel 3): the reference operator unrolls one step per window slot, and 17 x 17 slots make graphs of tens of
# thousands of nodes; the structure (dynamic kernels, context flow) is the same.
CASES = {
    'nat': ('nat_mini', {}, 64),
    'dinat': ('dinat_tiny', {}, 64),
    # the other neighbourhood-attention layouts: Swin-style DiNAT_s, the isotropic NAT and ViT with rpb
    'dinat_s': ('dinat_s_tiny', {}, 64),
    'nat_isotropic': ('dinat_isotropic_small', {}, 64),
    'vitrpb': ('vitrpb_small', {}, 224),
    'halonet': ('halonet_paper_h0', {}, 64),
    'overlock': ('overlock_xt', dict(kernel_size=(5, 5, 5, 5), smk_size=3), 64),
    'transnext': ('transnext_micro', {}, 64),
    # TransNeXt with mixture-of-heads gating (MoH-ViT): shared and routed heads; a routed stage in every size
    'moh': ('moh_transnext_base_50', {}, 64),
    'sparsifiner': ('sparsifiner_deit_small', {}, 224),
    'kdgqa': ('vit_small_patch16_224_kdgqa', {}, 224),
    's2lic': ('s2lic_tiny', {}, 64),  # a codec: already tiny, takes images in [0, 1], returns a dict
}
# Families whose models take any input size (within their size rule): exported with dynamic H and W, as
# family -> (example size, other sizes the program must run at, step every size is a multiple of).
# A program covers one size regime: where a stage map is smaller than its window, NAT pads and OverLoCK resizes
# (their official behaviour), and the dispatch table picks dense NA for small maps; those branches are size
# conditions that export turns into guards. The example and the other sizes share a regime (no padding or
# resizing; dense NA at strides 8-32 only).
# HaloNet's sizes cover both of its regimes: where a size is 96 the last stage (3 wide) is padded to whole blocks
# inside the attention, at 64 and 128 (2 and 4 wide) it is not.
DYNAMIC = {
    'nat': (96, [(96, 128), (128, 128)], 1),
    'dinat': (96, [(96, 128), (128, 128)], 1),
    'halonet': (64, [(64, 96), (96, 128), (128, 64)], 32),
    'overlock': (160, [(160, 192), (192, 224)], 32),
    'transnext': (64, [(96, 128), (128, 64)], 32),
    'moh': (64, [(96, 128), (128, 64)], 32),
}
CHEAP_ONNX = 'kdgqa'  # the one ONNX export of the default run (a few seconds)
# Cases whose compile repeats another case's graph with one addition (MoH: the gates) run it with -m heavy only;
# their jit trace stays in the default run (it is cheap and caught the bool scatter).
HEAVY_COMPILE = {'moh'}

pytestmark = pytest.mark.usefixtures('one_thread')


def build(family: str, size: Optional[int] = None):
    """(tiny model in eval mode, example input, of the family's size unless given) of a family."""
    name, overrides, default_size = CASES[family]
    size = size or default_size
    tiny = {} if name in zoo.models.list_codecs() else tiny_kwargs(name)
    torch.manual_seed(0)
    model = timm.create_model(name, **{**tiny, **overrides}).eval()
    return model, torch.rand(2, 3, size, size)


def leaves(output) -> list:
    """The tensors of a model output (a tensor, or a codec's nested dict) in order: ONNX returns them flat."""
    if isinstance(output, dict):
        return [t for value in output.values() for t in leaves(value)]
    return [output]


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('family', [pytest.param(f, marks=pytest.mark.heavy) if f in HEAVY_COMPILE else f
                                    for f in sorted(CASES)])
def test_compiles_as_one_graph(family):
    """fullgraph=True raises on any graph break; the 'eager' backend runs dynamo's graph without code generation
    (inductor's C++ build would add minutes and checks the compiler, not the model)."""
    model, x = build(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    torch.testing.assert_close(eager(compiled, x), eager(model, x), rtol=1e-5, atol=1e-5)


class FlatOutputs(torch.nn.Module):
    """The model with its output as a tuple of tensors: torch.jit.trace cannot type a codec's nested dict."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return tuple(leaves(self.model(x)))


@pytest.mark.parametrize('family', sorted(CASES))
def test_jit_trace(family):
    model, x = build(family)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # torch.jit.trace's deprecation and constant-size notices
        traced = torch.jit.trace(FlatOutputs(model), (x,), check_trace=False)
    torch.testing.assert_close(list(eager(traced, x)), leaves(eager(model, x)), rtol=1e-5, atol=1e-5)


def _dynamic_dims(step: int):
    """Dynamic H and W: any size (AUTO lets export derive the model's own bounds), or multiples of `step`."""
    if step == 1:
        return {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    return {2: step * torch.export.Dim('h_blocks', min=1, max=64), 3: step * torch.export.Dim('w_blocks', min=1,
                                                                                                max=64)}


@pytest.mark.heavy
@pytest.mark.parametrize('family', sorted(DYNAMIC))
def test_export_with_dynamic_height_and_width(family):
    """One exported program runs at sizes other than the example's and matches eager there."""
    size, sizes, step = DYNAMIC[family]
    model, x = build(family, size)
    program = torch.export.export(model, (x,), dynamic_shapes=(_dynamic_dims(step),))
    for size in sizes:
        other = torch.rand(2, 3, *size)
        torch.testing.assert_close(eager(program.module(), other), eager(model, other), rtol=1e-5, atol=1e-5)


def _check_onnx(family: str) -> None:
    """Export through torch.export (dynamo=True); the model passes onnx's checker and onnx's reference evaluator
    (pure numpy, no onnxruntime) reproduces eager."""
    onnx = require('onnx', "pip install -e '.[export]'")
    require('onnxscript', "pip install -e '.[export]'")
    from onnx.reference import ReferenceEvaluator
    model, x = build(family)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    evaluator = ReferenceEvaluator(program.model_proto)
    outputs = evaluator.run(None, {evaluator.input_names[0]: x.numpy()})
    torch.testing.assert_close([torch.from_numpy(out) for out in outputs], leaves(eager(model, x)), rtol=1e-4,
                               atol=1e-5)


def test_onnx_export_runs_and_matches_eager():
    _check_onnx(CHEAP_ONNX)


@pytest.mark.heavy
@pytest.mark.parametrize('family', sorted(set(CASES) - {CHEAP_ONNX}))
def test_onnx_export_of_every_family(family):
    _check_onnx(family)


@pytest.mark.parametrize('length,kernel_size,dilation', [(7, 3, 1), (9, 3, 2), (13, 5, 2), (17, 5, 3)])
def test_tables_built_in_the_graph_equal_the_eager_tables(length, kernel_size, dilation):
    """Capture computes the window tables in torch (window_geometry), eager reads cached numpy ones; the keys also
    follow the docstring's rule, checked position by position."""
    from zoo.layers import window_geometry as geometry

    def captured(fn, *args):
        return torch.compile(lambda: fn(*args, device=torch.device('cpu')), fullgraph=True, backend='eager')()

    torch._dynamo.reset()
    keys, bias = geometry.neighborhood_axis_numpy(length, kernel_size, dilation)
    graph_keys, graph_bias = captured(geometry.neighborhood_axis_tables, length, kernel_size, dilation)
    assert graph_keys.tolist() == keys.tolist() and graph_bias.tolist() == bias.tolist()
    for i in range(length):
        group, in_group = i % dilation, i // dilation
        group_len = -(-(length - group) // dilation)
        start = min(max(in_group - kernel_size // 2, 0), group_len - kernel_size)
        assert keys[i].tolist() == [group + dilation * (start + t) for t in range(kernel_size)]
    width = length + 2
    assert (captured(geometry.rpb_index, length, width, kernel_size, dilation).numpy()
            == geometry.rpb_index_numpy(length, width, kernel_size, dilation)).all()
    assert (captured(geometry.window_valid_mask, length, width, kernel_size).numpy()
            == geometry.padded_window_valid_numpy(length, width, kernel_size)).all()


@pytest.mark.parametrize('query,key,pretrain', [((8, 6), (2, 3), (16, 16)), ((7, 7), (7, 7), (7, 7)),
                                                ((7, 10), (3, 4), (8, 8))])
def test_cpb_built_in_the_graph_gives_the_eager_offsets(query, key, pretrain):
    """TransNeXt's continuous position bias: eager uses the distinct offsets (numpy unique), a graph with symbolic
    sizes a closed form: the same table where the pooling bins are equal, a superset otherwise (the last case).
    Every (query, key) pair must read the same coordinates from both."""
    from zoo.layers.aggregated_attn import relative_coords_cpb
    torch._dynamo.reset()
    captured = torch.compile(relative_coords_cpb, fullgraph=True, backend='eager', dynamic=True)
    table, index = relative_coords_cpb(query, key, pretrain)
    graph_table, graph_index = captured(query, key, pretrain)
    assert torch.equal(graph_table[graph_index], table[index])
    if all(q % k == 0 for q, k in zip(query, key)):
        assert torch.equal(graph_table, table) and torch.equal(graph_index, index)
