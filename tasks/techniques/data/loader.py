"""Input pipeline settings: DataLoader knobs and the pre-processed (augmented) data cache.

The split arrays are decoded and standardised once by ``prepare_data``. What still costs time per
epoch is augmentation; with ``augment_copies > 0`` the augmented copies are computed once, stored
next to the splits (``tasks.techniques.data.augment``) and read back each epoch instead of recomputed.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from optforge.tasks.techniques.config import TechniqueConfig


class LoaderConfig(TechniqueConfig):
    """``torch.utils.data.DataLoader`` settings of each training worker, and the augmentation cache."""

    workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker (0: load in-process)")
    pin_memory: bool = Field(False, description="page-locked host batches, for faster copies to a GPU")
    persistent_workers: bool = Field(False, description="keep loader processes alive between epochs (needs workers > 0)")
    prefetch_factor: int | None = Field(None, ge=1, description="batches each loader process prepares ahead "
                                        "(needs workers > 0; default 2)")
    augment_copies: int = Field(0, ge=0, description="augmented copies of the train split (0: no augmentation); "
                                "epoch e trains on copy e mod N")
    noise_std: float = Field(0.1, ge=0, description="augmentation: std of Gaussian noise added to the features")
    max_shift: int = Field(1, ge=0, description="augmentation of images (data.image_shape): random shift, in pixels")
    cache: bool = Field(True, description="compute the augmented copies once and reuse them (false: augment every epoch)")

    @model_validator(mode="after")
    def _needs_workers(self):
        if self.workers == 0 and self.persistent_workers:
            raise ValueError("train.loader.persistent_workers needs train.loader.workers > 0")
        if self.workers == 0 and self.prefetch_factor is not None:
            raise ValueError("train.loader.prefetch_factor needs train.loader.workers > 0")
        if self.persistent_workers and self.augment_copies > 0:
            # Persistent loader processes keep the dataset object they started with, so they would
            # never see set_epoch pick the next augmented copy.
            raise ValueError("train.loader.persistent_workers cannot be combined with train.loader.augment_copies > 0")
        return self
