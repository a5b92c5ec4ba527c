"""``mgd_synthetic``: the procedurally generated dataset of :mod:`mgd_jax.data.synthetic`.

One tfds config per :class:`~mgd_jax.data.synthetic.SyntheticSpec`: ``default`` for the default
sizes, otherwise a name that spells the sizes out (``c5_s96_n800_v200_seed0``).
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from mgd_jax.data import synthetic
from mgd_jax.data.builders.common import MgdBuilder, png_bytes
from mgd_jax.data.datasets import DATASETS


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    spec: synthetic.SyntheticSpec = dataclasses.field(default_factory=synthetic.SyntheticSpec)

    @classmethod
    def from_spec(cls, spec: synthetic.SyntheticSpec) -> SyntheticConfig:
        return cls(name=spec.config_name, spec=spec,
                   description=f"synthetic shapes x textures: {spec}")


class MgdSynthetic(MgdBuilder):
    """Shapes x textures on cluttered backgrounds; needs no files."""

    VERSION = tfds.core.Version(DATASETS["synthetic"].version)
    BUILDER_CONFIGS = [SyntheticConfig.from_spec(synthetic.SyntheticSpec())]
    DATASET = "synthetic"
    IMAGE_FORMAT = "png"  # lossless: the textures are the signal
    SHARD_EXAMPLES = 8192

    @property
    def spec(self) -> synthetic.SyntheticSpec:
        return self.builder_config.spec

    def dataset_info(self):
        return synthetic.dataset_info(self.spec)

    def make_plan(self, dl_manager):
        self._source_description = {"synthetic": dataclasses.asdict(self.spec)}
        return {split: range(n) for split, n in self.spec.split_sizes.items()}

    def encode(self, split, index):
        image, label = synthetic.render(self.spec, split, index)
        key = f"{split}_{index:06d}"
        return key, {"image": png_bytes(image), "label": png_bytes(label), "key": key}
