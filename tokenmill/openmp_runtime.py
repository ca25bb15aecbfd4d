"""How long the OpenMP runtime's idle threads spin before they sleep, set before torch loads it.

Imported first by `tokenmill/__init__.py`. The engine's kernels and torch's CPU ops share torch's
libgomp, which reads `GOMP_SPINCOUNT` once, when it loads (when torch is first imported). Unset, an
idle thread spins 300,000 times (milliseconds) at the end of each parallel region and between them
before it sleeps. On a machine with other busy processes (another engine, a test suite, a second Ray
replica) the spinning threads take the cores from the threads they wait for: two engines prefilling
at once on 2 cores ran 130 and 131 prompt tokens/s against 1,685 for one alone (the default), and
~700 each at 3,000 spins (docs/PERFORMANCE.md, "Sharing the machine"). A short spin still hands a
step's ops from one to the next without a sleep (a decode step's gaps between ops are microseconds):
a lone engine's decode steps were 0-3% slower at 3,000 spins (SmolLM2 within the noise; the 1B-shaped
Q4_K_M file B=1 ~1.5%, B=32 ~1%), and SmolLM2's at B=64 2-4% at 1,000, which shares the machine
better still (~800 each).

A `GOMP_SPINCOUNT` the user set is kept. Where torch was imported before tokenmill the runtime has
already read its settings, and this changes nothing. The variable is set only while torch loads:
processes started from this one (llama.cpp's benchmark, which has its own OpenMP runtime) get the
environment as the user left it.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "3000"

if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        import torch  # noqa: F401  (loads libgomp, which reads the variable now)
    finally:
        del os.environ["GOMP_SPINCOUNT"]
