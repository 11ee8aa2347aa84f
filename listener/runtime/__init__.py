"""The daemon and what it runs: wiring, the worker loop, one request's processing."""
