"""The measuring client: end-to-end delay, jitter and throughput, hop by hop,
with reports people can read. Run `loadtest --help` or `python -m loadtest`."""

__version__ = "0.1.0"
