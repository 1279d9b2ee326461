"""Step-time and memory benchmark; the code lives in :mod:`falign.app.bench.speed` (also ``falign bench speed``).

Run:  python benchmarks/step_time.py [--compile] [--device cuda] [--repeats 300] [--json out.json]
"""

from falign.app.bench.speed import main

if __name__ == "__main__":
    main()
