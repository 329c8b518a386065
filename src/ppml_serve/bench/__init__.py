"""Benchmarks: closed-loop load through the pipeline, and the raw engine as the reference."""
