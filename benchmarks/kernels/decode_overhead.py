"""Where the host time of one eager ``flash_decode`` call goes (cProfile, top entries).

    PYTHONPATH=. python3 benchmarks/kernels/decode_overhead.py
"""

import cProfile
import pstats

import torch

from srl.kernels.flash_attention import flash_decode


def main(calls: int = 2000) -> None:
    q = torch.randn(1, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 16, 1024, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with torch.no_grad():
        flash_decode(q, k, v)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            flash_decode(q, k, v)
        prof.disable()
        torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
