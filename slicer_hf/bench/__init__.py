"""Benchmarks on the real model and real text (`python -m slicer_hf.bench.<name> --help`)."""
