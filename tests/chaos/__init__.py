"""Chaos scenarios: real daemons, real PostgreSQL, real kills and outages (see ``run.py``)."""
