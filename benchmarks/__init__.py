"""Benchmarks (installed as fastlayers.benchmarks): bench_<op>.py define cases; common.py times and reports."""
