"""TF-Slim checkpoints: pure-Python TensorBundle reader/writer and the name mapping."""

from resnet_flax.slim.checkpoint_export import save_slim_checkpoint, variables_to_slim
from resnet_flax.slim.checkpoint_import import SlimCheckpointError, global_step, load_variables

__all__ = ['SlimCheckpointError', 'global_step', 'load_variables', 'save_slim_checkpoint', 'variables_to_slim']
