"""Datasets for trials: decoded once per node, held on the trial's device, batched by index.

``load_splits(cfg, seed=...)`` returns uint8 train/validation/test tensors and the statistics the
augmentation needs; :class:`DeviceData` moves them to the device once and yields normalised,
augmented batches with no per-sample Python (random crop with zero padding, horizontal flip, and the
VGG paper's "random RGB colour shift", i.e. AlexNet's PCA lighting noise). The test split is the same
for every trial; the validation split is carved from training with the trial's seed.

Sources (``DATASETS``): ``digits`` (embedded in scikit-learn, offline) and ``synthetic`` (generated)
always work; ``cifar10``, ``cifar100``, ``stl10``, ``food101`` and ``imagefolder`` read real files
through torchvision from ``data.dir`` or ``$SWEEPER_CACHE_DIR/data/<name>`` and raise
:class:`DatasetUnavailable` when absent.
"""

from sweeper.data.cache import cache_root
from sweeper.data.device import DeviceData
from sweeper.data.sources import DATASETS, DatasetSpec, DatasetUnavailable
from sweeper.data.splits import Splits, load_splits, num_classes, resolution, source_dir

__all__ = ["DATASETS", "DatasetSpec", "DatasetUnavailable", "DeviceData", "Splits", "cache_root",
           "load_splits", "num_classes", "resolution", "source_dir"]
