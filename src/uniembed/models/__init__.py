"""Backbones (registry + factory), pooling, projection heads and margin losses."""

from uniembed.models.registry import Backbone, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "create_backbone", "list_backbones", "register_backbone"]
