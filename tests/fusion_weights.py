"""Move a fusion's weights off their initialization so that tests can see the fusion.

docs/design.md §7 starts the gates near 0 and §4a starts the text terms at exactly 0, so a fresh model
fuses almost nothing: a test of fusion, gates or text guidance would pass trivially on it.
"""
from __future__ import annotations

import torch

from modules.fusion import FusionTransformer


def spread_fusion_weights(fusion: FusionTransformer, cross_attn: bool = False, text_scales: bool = False) -> None:
    """In place: every gate's first linear (its text block too) ~ N(0, 0.3²) and output ~ N(0, 0.5²);
    with ``cross_attn`` each block's cross-attention output projection ~ N(0, 0.3²) first; with
    ``text_scales`` each ungated injection scale 0.8 - 0.5 * layer (a scale of its own per layer)."""
    with torch.no_grad():
        for layer, block in enumerate(fusion.blocks):
            if cross_attn:
                block.cross_attn.out_proj.weight.normal_(std=0.3)
            for gate in block.gates.values():
                gate.fc1.weight.normal_(std=0.3)
                gate.fc2.weight.normal_(std=0.5)
                if gate.fc1_text is not None:
                    gate.fc1_text.weight.normal_(std=0.3)
            if text_scales and block.text_scale is not None:
                block.text_scale.fill_(0.8 - 0.5 * layer)
