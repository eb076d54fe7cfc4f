"""Research probes: measurements behind decisions (bench/RESULTS.md), apart from the benchmarks."""
