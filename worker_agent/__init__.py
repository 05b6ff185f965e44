"""The worker agent: dials out to the edge and serves requests from its tunnels."""

__version__ = "0.1.0"
