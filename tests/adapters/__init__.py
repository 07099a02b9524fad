"""Adapter tests: tiny configs for every MoE family and an independent NumPy routing reference."""
