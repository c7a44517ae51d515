"""Images are decoded into memory-mapped arrays one at a time and read back a batch at a time: preparing
and training over a dataset larger than the bound below does not grow the process's memory with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# 1,500 RGB images at 64x64 are 1,500 x 3 x 64 x 64 x 4 B = 74 MB of float32 pixels; the process may grow
# by at most 40 MB while preparing them and running one training epoch over them.
BOUND_MB = 40
SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np, torch
from torch.utils.data import DataLoader
from optforge.flows.examples import write_image_folder
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.workers.worker_common import PartDataset

root = Path(sys.argv[1])
write_image_folder(root / "imgs", per_class=150, size=64)
import PIL.Image  # warm the imports before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
folder = prepare(DataConfig(source=str(root / "imgs"), image_size=64), root / "data")
splits = load_splits(folder)
seen = 0
for inputs, labels in DataLoader(PartDataset(splits.train), batch_size=64, shuffle=True):
    seen += len(labels)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data_mb = sum(v.nbytes for p in (splits.train, splits.val, splits.test) for v in p.inputs.values()) / 1e6
print(seen, data_mb, (peak - base) / 1e3)
"""


def test_preparing_and_reading_images_does_not_hold_them_in_memory(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen, data_mb, grew_mb = out.stdout.split()
    assert int(seen) > 1000 and float(data_mb) > 70
    assert float(grew_mb) < BOUND_MB, f"memory grew {grew_mb} MB for {data_mb} MB of images"
