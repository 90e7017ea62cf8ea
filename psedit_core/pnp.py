"""Plug-and-Play (Tumanyan et al. 2023) as its reference code (pnp-diffusers) does it: which layers it touches and
what it hands on, as pure functions (the tensor rule itself is :func:`psedit_core.attention.replace_chunks`).

Per step ``t`` of its windows (``t < int(f n)``, ``pnp_f_t`` 0.8 for features, ``pnp_attn_t`` 0.5 for
self-attention), with the source pass's tensors marked ``src`` (the trajectory's latent at ``t``, the empty prompt):

    h_out = skip(h_edt) + res_src         one decoder ResBlock (up_blocks[1].resnets[1])                       (P1)
    O     = softmax(Q_src K_src^T / sqrt(d)) V_edt     self-attention of the decoder from that block on        (P2)

for every branch the guider evaluates (the reference's unconditional and conditional rows alike). ``block input``
is PSEdit's variant of (P1): ``h_out = block(h_src, skip_src)``, the whole block's input replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

INJECT = ("residual", "block input")


def default_feature_block(has_attention: Sequence[bool]) -> int:
    """The reference's feature block: the second decoder block at the coarsest resolution that has attention (SD1.x:
    output block 4 = diffusers' ``up_blocks[1].resnets[1]``; SDXL: output block 1). ``has_attention``: per output
    block, whether it holds a transformer."""
    first = next((i for i, a in enumerate(has_attention) if a), 0)
    return min(first + 1, len(has_attention) - 1)
