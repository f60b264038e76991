"""The CPU's float32 FMA peak: what 100% means for the GEMM and attention figures.

  python benchmarks/fma_peak.py [--seconds=1] [--json_out=benchmarks/results/fma_peak.json]

Builds a tiny C program (g++ -O2 -march=native) whose threads each run 24 independent chains of
512-bit (or, without AVX-512, 256-bit) fused multiply-adds on registers, with no memory traffic,
and times it on 1 and on every CPU (best of 3 each). FLOPs = 2 x lanes per FMA. The jitted GEMM
probe that jaxserve-bench rates MFU against (XLA's 2048^3 matmul) reaches only part of this, so
both are worth knowing: the probe is what a library achieves, this is the arithmetic ceiling.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__AVX512F__)
typedef __m512 V;
#define FMA _mm512_fmadd_ps
#define SPLAT _mm512_set1_ps
#define LANES 16
#else
typedef __m256 V;
#define FMA _mm256_fmadd_ps
#define SPLAT _mm256_set1_ps
#define LANES 8
#endif
static long iters;
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static void* run(void* out) {
  V a[24], b = SPLAT(1.0000001f), c = SPLAT(0.999999f);
  for (int i = 0; i < 24; ++i) a[i] = SPLAT((float)i);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) a[i] = FMA(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 24; ++i) s += ((float*)&a[i])[0];
  *(float*)out = s;  /* keeps the chains alive */
  return 0;
}
int main(int argc, char** argv) {
  const int threads = atoi(argv[1]);
  iters = atol(argv[2]);
  pthread_t t[256];
  float r[256];
  const double t0 = now();
  for (int i = 0; i < threads; ++i) pthread_create(&t[i], 0, run, &r[i]);
  for (int i = 0; i < threads; ++i) pthread_join(t[i], 0);
  const double dt = now() - t0;
  printf("%d %d %.9f\n", LANES, threads, dt);
  return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0, help="about this long per timing")
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/fma_peak.json"))
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        src = Path(tmp) / "fma_peak.c"
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O2", "-march=native", "-pthread", str(src), "-o", str(exe)],
                       check=True)

        def gflops(threads: int, iters: int) -> tuple[float, int]:
            lanes, _, dt = subprocess.run([str(exe), str(threads), str(iters)], check=True,
                                          capture_output=True, text=True).stdout.split()
            return threads * iters * 24 * 2 * int(lanes) / float(dt) / 1e9, int(lanes)

        # Calibrate to about --seconds, then best of 3.
        rate, lanes = gflops(1, 10_000_000)
        iters = max(1, int(args.seconds * rate * 1e9 / (24 * 2 * lanes)))
        result = {}
        for threads in sorted({1, cpus}):
            result[threads] = max(gflops(threads, iters)[0] for _ in range(3))
    print(cpu_line())
    for threads, g in result.items():
        print(f"{threads} thread(s): {g:7.1f} GFLOP/s float32 FMA peak ({g / threads:.1f} per core; "
              f"{g / threads / (2 * 2 * lanes):.2f} GHz at two {lanes * 32}-bit FMAs per cycle)")
    out = {"cpu": cpu_description(), "vector_bits": lanes * 32, "gflops_by_threads": result,
           "command": "python benchmarks/fma_peak.py" + (
               f" --seconds={args.seconds}" if args.seconds != 1.0 else "")}
    write_json(args.json_out, out)


if __name__ == "__main__":
    main()
