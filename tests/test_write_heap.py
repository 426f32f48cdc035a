"""The write pipeline's malloc setting (`run.keep_freed_heap`): repeated codec encodes reuse freed memory instead of
faulting in fresh pages each time. Counted in page faults (getrusage) in a fresh process, not in time."""

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np, numcodecs
if sys.argv[1] == "kept":
    from saecache.harvest.run import keep_freed_heap
    keep_freed_heap()
a = (np.random.default_rng(0).standard_normal((32768, 256), dtype=np.float32)).astype(np.float16)
enc = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=2, typesize=2)
faults = []
for rep in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blobs = [enc.encode(a[i:i + 4096]) for i in range(0, len(a), 4096)]
    del blobs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_repeated_encodes_reuse_the_heap():
    default, kept = _faults("default"), _faults("kept")
    # 8 chunks of 2 MB per rep: with glibc's defaults every rep maps (and faults in) its buffers afresh
    assert min(default[1:]) > 2000, default
    assert max(kept[2:]) < min(default[1:]) / 4, (kept, default)
