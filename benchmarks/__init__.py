"""Benchmarks of mirasc's generated ops: `python -m benchmarks {cpu,gpu,compile}` (see RESULTS.md)."""
