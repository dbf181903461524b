"""Throughput of fastrnn's backends against torch.nn, an eager cell loop and that loop under torch.compile.

``python benchmarks/bench_rnn.py --quick`` writes ``results.csv``, ``results.md`` and ``results.png`` to
``--out``; benchmarks/README.md says what is measured and how to read the output. The harness itself is
the ``rnnbench`` package beside this script.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rnnbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
