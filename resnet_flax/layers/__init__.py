"""Layers with TF-Slim semantics: BatchNorm (the heart) and slim-style convolutions."""

from resnet_flax.layers.batch_norm import BATCH_STATS, BatchNorm
from resnet_flax.layers.conv import Conv2D
from resnet_flax.layers.end_points import INTERMEDIATES, sow_end_point

__all__ = ['BATCH_STATS', 'BatchNorm', 'Conv2D', 'INTERMEDIATES', 'sow_end_point']
