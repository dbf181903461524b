"""The benchmark harness behind ``benchmarks/bench_rnn.py``.

- ``cases``: configurations, the cases built from them, and the runners of every implementation;
- ``baselines``: the plain PyTorch cell loop (eager and under torch.compile);
- ``timing``: clocks, calibration, peak memory, the GEMM peak and the statistics of the rounds;
- ``runner``: the sanity check against torch.nn and the timed rounds of one case;
- ``report``: the CSV, markdown and plot, ``--compare`` and ``--summary``;
- ``cli``: the command line.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run from a checkout without installing fastrnn
