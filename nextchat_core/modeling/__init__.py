"""Pure ``nn.Module``s of NExT-Chat: no file, environment or network access here.
Weights arrive only through :mod:`nextchat_core.build`."""

from .nextchat import NextChatModel
from .outputs import GenerationOutput, MaskOutput, NextChatOutput
from .vision_tower import VisionTower

__all__ = ["GenerationOutput", "MaskOutput", "NextChatModel", "NextChatOutput", "VisionTower"]
