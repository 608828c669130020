"""Benchmark scripts (not tests): each starts or reaches a fleet, measures, prints and writes JSON."""
