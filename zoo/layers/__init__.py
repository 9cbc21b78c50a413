from .neighborhood import neighborhood_attention_2d, na2d_qk, na2d_av, neighborhood_indices
