"""tfds builders (array_record, TensorFlow-free): importing this package registers
``mgd_voc_aug``, ``mgd_cityscapes``, ``mgd_synthetic`` and ``mgd_folder`` (a dataset of your
own) with tfds.

Prepare data with ``mgd-prepare`` (see :mod:`mgd_jax.data.prepare`), which
checks the manual files before writing and prints the totals.
"""

from mgd_jax.data.builders.cityscapes import MgdCityscapes
from mgd_jax.data.builders.folder import MgdFolder
from mgd_jax.data.builders.synthetic import MgdSynthetic, SyntheticConfig
from mgd_jax.data.builders.voc_aug import MgdVocAug

BUILDERS = {"voc": MgdVocAug, "cityscapes": MgdCityscapes, "synthetic": MgdSynthetic,
            "folder": MgdFolder}

__all__ = ["BUILDERS", "MgdCityscapes", "MgdFolder", "MgdSynthetic", "MgdVocAug",
           "SyntheticConfig"]
