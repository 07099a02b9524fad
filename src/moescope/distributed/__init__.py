"""Capture and analysis on a Ray cluster: the same trace and the same results as in-process, spread over workers."""
