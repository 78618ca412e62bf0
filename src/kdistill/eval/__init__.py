"""Metrics, latency, and the run report."""
