"""Progress bars: a bounded number of plain lines into a pipe, tqdm's live bar on a terminal."""

import io
import subprocess
import sys

from unet_dcnv4.progress import progress

_RUN = """
import time
from unet_dcnv4.progress import progress
bar = progress(total=3000, desc="train", interval=0.2)
for step in range(3000):
    time.sleep(0.0003)
    bar.update(1)
    bar.set_postfix(loss=f"{step:.4f}")
bar.close()
"""


def test_a_pipe_gets_a_line_per_interval():
    result = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and 1 <= len(lines) <= 20, result.stderr
    assert lines[-1].startswith("train: 100%") and "3000/3000" in lines[-1] and "loss=2999" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_keeps_the_live_bar():
    out = _Terminal()
    bar = progress(total=50, desc="train", file=out)
    for _ in range(50):
        bar.update(1)
        bar.set_postfix(loss="1.0")
    bar.close()
    assert out.getvalue().count("\r") >= 50
