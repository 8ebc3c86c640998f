"""The machine a bench row was measured on, in one line: CPU model, cores this process
may use, and the instruction sets that change which kernels run (AVX2, AVX-512,
AVX-512 BF16, AMX)."""
from __future__ import annotations

import os

FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
         ("amx_tile", "AMX"))


def cpu_line() -> str:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [name for flag, name in FLAGS if flag in flags]
    return (f"{model}, {len(os.sched_getaffinity(0))} cores, "
            f"{'/'.join(have) if have else 'no AVX2'}")


if __name__ == "__main__":
    print(cpu_line())
