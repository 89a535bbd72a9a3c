"""The dispatcher's benchmark: ``make bench`` (or ``.venv/bin/python bench/run.py``).

Modules: ``run`` (the entry point and the scenarios), ``receiver`` (the HTTPS endpoint,
its own process), ``ceiling`` (a bare aiohttp client, its own process), ``infra``
(database, topics, TLS, child processes), ``workload`` (subscriptions and events),
``procstat`` (CPU and memory from /proc), ``report`` (table and JSON), and two
diagnostics: ``gctrace`` (GC pauses and event-loop lag of a dispatcher) and
``profiling`` (reading a cProfile dump). See docs/benchmarks.md.
"""
