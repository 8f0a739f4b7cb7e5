"""TF-Slim checkpoints: pure-Python TensorBundle reader/writer and the name mapping."""

from resnet_flax.slim.checkpoint_export import save_slim_checkpoint, variables_to_slim
from resnet_flax.slim.checkpoint_import import SlimCheckpointError, load_variables, load_variables_and_step

__all__ = ['SlimCheckpointError', 'load_variables', 'load_variables_and_step', 'save_slim_checkpoint', 'variables_to_slim']
