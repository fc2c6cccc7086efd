"""Benchmarks: a load generator, a fast fixture upstream, and the direct-vs-gateway comparison.

python -m bench load URL ...        one run against any URL (see bench/load.py)
python -m bench upstream --port P   the fast fixture upstream (see bench/upstream.py)
python -m bench compare ...         direct vs through the gateway, side by side (see bench/compare.py)
"""
