"""Building blocks shared by the model families: operators (plain-PyTorch references, backends picked by
zoo.layers.kernels.dispatch) and the modules built on them. Module constants (backend and border choices, schemes)
stay in their modules, as do the codec helpers of entropy_tables."""
from .aggregated_attn import (
    AggregatedAttention, ScaledCosineAttention, continuous_position_bias, relative_coords_cpb, window_av,
    window_length_scale, window_qk,
)
from .contmix import (
    GRN, ConvLayerScale, ContMix, DilatedReparamBlock, ResDWConv, SqueezeExcite2d, contmix_aggregate,
    fold_dilated_reparam,
)
from .convglu import ConvGLU, DepthwiseConv3x3
from .dense_enhance import DenseBlock, EnhancementBlock
from .grouped_query_attn import (
    GroupedQueryAttention, convert_mha_to_gqa, dgqa_allocation, dgqa_ratio, grouped_query_attention, kdgqa_allocation,
    key_norms, kv_head_index, mean_pool_kv_heads, pgqa_perturb, repair_allocation, replay_on_recompute,
    uniform_allocation,
)
from .halo_attn import HaloAttention, RelPosEmbed2d, check_halo_shapes, halo_attention_2d, halo_relative_logits
from .neighborhood import na2d_av, na2d_qk, na2d_rpb, neighborhood_attention_2d
from .neighborhood_attn import NeighborhoodAttention2d, neighborhood_attention_macs, pad_to_window
from .sparse_attn import (
    ConnectivityPredictor, attention_budget, connectivity_mask, connectivity_topk, dense_attention, masked_attention,
    topk_sparse_attention,
)
from .swinv2 import PaddedSwinV2Block, ResidualSwinV2Block
from .window_geometry import (
    check_kernel_size, check_window_fits, neighborhood_axis_numpy, neighborhood_axis_tables, neighborhood_indices,
    padded_window_valid_numpy, rpb_index, rpb_index_numpy, scatter_rpb, window_valid_mask,
)

__all__ = [
    # neighbourhood attention
    'neighborhood_attention_2d', 'na2d_qk', 'na2d_av', 'na2d_rpb', 'NeighborhoodAttention2d', 'pad_to_window',
    'neighborhood_attention_macs',
    # halo attention
    'HaloAttention', 'RelPosEmbed2d', 'halo_attention_2d', 'halo_relative_logits', 'check_halo_shapes',
    # TransNeXt aggregated attention
    'AggregatedAttention', 'ScaledCosineAttention', 'window_qk', 'window_av', 'window_length_scale',
    'relative_coords_cpb', 'continuous_position_bias', 'ConvGLU', 'DepthwiseConv3x3',
    # OverLoCK ContMix
    'ContMix', 'DilatedReparamBlock', 'GRN', 'SqueezeExcite2d', 'ResDWConv', 'ConvLayerScale', 'contmix_aggregate',
    'fold_dilated_reparam',
    # grouped-query attention
    'GroupedQueryAttention', 'grouped_query_attention', 'convert_mha_to_gqa', 'kdgqa_allocation', 'dgqa_allocation',
    'dgqa_ratio', 'key_norms', 'kv_head_index', 'mean_pool_kv_heads', 'pgqa_perturb', 'repair_allocation',
    'uniform_allocation', 'replay_on_recompute',
    # Sparsifiner sparse attention
    'ConnectivityPredictor', 'connectivity_topk', 'connectivity_mask', 'masked_attention', 'topk_sparse_attention',
    'dense_attention', 'attention_budget',
    # S2LIC blocks
    'PaddedSwinV2Block', 'ResidualSwinV2Block', 'DenseBlock', 'EnhancementBlock',
    # window geometry shared by the operators and their kernels
    'check_kernel_size', 'check_window_fits', 'neighborhood_indices', 'neighborhood_axis_numpy',
    'neighborhood_axis_tables', 'rpb_index_numpy', 'rpb_index', 'scatter_rpb', 'padded_window_valid_numpy',
    'window_valid_mask',
]
