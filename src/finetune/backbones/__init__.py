"""Pretrained backbones: the registry and the families that fill it."""

from finetune.backbones.registry import (
    BackboneSpec,
    Preprocessing,
    WeightsStatus,
    get_backbone,
    list_backbones,
    load_backbone,
    register_backbone,
)

__all__ = [
    "BackboneSpec",
    "Preprocessing",
    "WeightsStatus",
    "get_backbone",
    "list_backbones",
    "load_backbone",
    "register_backbone",
]
