"""Print the top functions (own time) of each worker profile written under SRL_PROFILE_DIR.

    SRL_PROFILE_DIR=prof python benchmarks/throughput.py ...; python benchmarks/profile_summary.py prof
"""
from __future__ import annotations

import glob
import io
import os
import pstats
import sys


def main() -> None:
    folder = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 18
    for path in sorted(glob.glob(os.path.join(folder, "*.prof"))):
        out = io.StringIO()
        stats = pstats.Stats(path, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        print(f"==== {os.path.basename(path)}")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
