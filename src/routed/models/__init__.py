"""Models built from routed layers.

``import routed.models`` registers the BiFormer backbones with timm (``biformer_tiny``,
``biformer_small``, ``biformer_base``), so ``timm.create_model("biformer_tiny", ...)`` works after it.
"""

from .biformer import (BiFormer, BiFormerStage, BRABlock, GlobalAttentionLePE, WindowRegionAttention,
                       biformer_base, biformer_small, biformer_tiny, static_region_ids)

__all__ = ["BiFormer", "BiFormerStage", "BRABlock", "GlobalAttentionLePE", "WindowRegionAttention", "static_region_ids",
           "biformer_tiny", "biformer_small", "biformer_base"]
