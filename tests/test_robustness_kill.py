"""A kill at any point of ``save`` leaves the old checkpoint or the new one at the path, loadable.

A child process saves two different networks in turn to one path, as fast as it can; the parent kills
it (SIGKILL) after a random delay (seeded: the same delays on every run), then loads what is there.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deltaprop.backend import to_numpy
from deltaprop.model import MLP

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

SIZES = [64, 128, 10]  # ~10k parameters: a save takes long enough for kills to land inside it
SAVER = """
import sys
from deltaprop.model import MLP
nets = [MLP({sizes}, backend="numpy", seed=seed) for seed in (1, 2)]
path = sys.argv[1]
nets[0].save(path)
print("ready", flush=True)
k = 0
while True:
    k += 1
    nets[k % 2].save(path)
"""


def test_a_killed_save_leaves_the_old_or_the_new_file(tmp_path):
    path = tmp_path / "net.npz"
    expected = [to_numpy(MLP(SIZES, backend="numpy", seed=seed).params) for seed in (1, 2)]
    rng = np.random.default_rng(18)
    for _ in range(24):
        child = subprocess.Popen([sys.executable, "-c", SAVER.format(sizes=SIZES), str(path)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        params = to_numpy(MLP.load(path, backend="numpy").params)
        assert any(np.array_equal(params, e) for e in expected)
    orphans = [name for name in os.listdir(tmp_path) if name != "net.npz"]
    MLP(SIZES, backend="numpy").save(path)  # the next save removes what the killed ones left
    assert os.listdir(tmp_path) == ["net.npz"], orphans
