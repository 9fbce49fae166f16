"""Benchmarks of the SCP pipeline: `python -m benchmarks.bench {data,step,scaling,head,all,report}`.

Each benchmark prints a table and the machine it ran on, writes
`benchmarks/results/<name>-<host kind>.json` and rebuilds the generated section of BENCHMARKS.md
from every result file. Numbers are measured, never asserted; see benchmarks/bench/common.py.
"""

from benchmarks.bench.common import BenchResult, update_markdown

__all__ = ["BenchResult", "update_markdown"]
