from .neighborhood import neighborhood_attention_2d, na2d_qk, na2d_av, neighborhood_indices
from .halo_attn import HaloAttention, halo_attention_2d, halo_relative_logits
from .aggregated_attn import AggregatedAttention, ScaledCosineAttention, window_av, window_qk
from .convglu import ConvGLU
from .grouped_query_attn import GroupedQueryAttention, grouped_query_attention, convert_mha_to_gqa, kdgqa_allocation
from .neighborhood import na2d_rpb
from .contmix import ContMix, DilatedReparamBlock, contmix_aggregate
from .sparse_attn import ConnectivityPredictor, connectivity_mask, connectivity_topk, masked_attention, topk_sparse_attention
from .swinv2 import PaddedSwinV2Block, ResidualSwinV2Block
from .dense_enhance import DenseBlock, EnhancementBlock
