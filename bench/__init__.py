"""Throughput benchmarks: no-op jobs per second through one `dramatiq` process, per broker."""
