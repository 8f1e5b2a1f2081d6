"""Benchmarks of the EV charging network: throughput, latency, restart time, scale.

Run them all with ``make bench`` (``python -m bench.run_all``); each module
also runs alone (``python -m bench.ingest`` ...). See bench/README.md.
"""
