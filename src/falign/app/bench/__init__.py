"""Benchmarks behind ``falign bench``: accuracy against BioTorch's published tables, and step time."""
