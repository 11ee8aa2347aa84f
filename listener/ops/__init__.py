"""What operators see: logs, metrics, the health/readiness/metrics endpoints."""
