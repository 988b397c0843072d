"""Benchmarks: one module per experiment, each writing results.json, report.md and PNGs."""
