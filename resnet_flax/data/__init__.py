"""Input pipelines: embedded digits, CIFAR-10, ImageFolder trees (JPEG, PNG, ...), synthetic.

  ds = data.build(config.data, 'train', batch_size=128, seed=0)
  for batch in data.prefetch(ds.train_batches(start_step)):  # {'image', 'label', 'mask'}
    images = ds.model_input(batch['image'])  # uint8 photos -> the model's float32 input
    ...
  for batch in ds.eval_batches():  # one pass; padded last batch, `mask` marks real examples
    ...

`resnet_flax.device_input` does both on the way to the devices: the copy a batch ahead,
`model_input` on the device.

The batch at step s depends only on (seed, s, process_index, process_count), so resuming
at `start_step` reproduces an uninterrupted run exactly. This package knows nothing of models.
"""

from resnet_flax.data.builder import NAMES, READ_ONLY_WITH, build, check_config, effective_fields
from resnet_flax.data.errors import DataError
from resnet_flax.data.pipeline import Batch, Dataset, SkippedImageWarning
from resnet_flax.data.prefetch import prefetch

__all__ = ['NAMES', 'READ_ONLY_WITH', 'Batch', 'DataError', 'Dataset', 'SkippedImageWarning', 'build', 'check_config',
           'effective_fields', 'prefetch']
