"""PSEdit's ComfyUI nodes (V3 API). Thin: validate inputs, call :mod:`psedit_core`, return ComfyUI objects."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .flowedit import FlowEditFluxGuiderNode, FlowEditGuiderNode
from .flux import FluxGuiderNode
from .guidance import PerceptualGuidanceNode, StepWindowNode, TripleGuiderNode
from .inversion import DDIMInvert, InvertedNoiseNode
from .masks import EditMask
from .nulltext import NullTextInversion
from .p2p import AttentionControlNode
from .pnp import FeatureInjectionNode

NODES: list[type[io.ComfyNode]] = [
    DDIMInvert, NullTextInversion, TripleGuiderNode, PerceptualGuidanceNode, StepWindowNode, EditMask,
    InvertedNoiseNode, FluxGuiderNode, AttentionControlNode, FeatureInjectionNode,
]
NODES += [FlowEditGuiderNode, FlowEditFluxGuiderNode]


class PSEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
