"""The queue's SQL functions, called over SQL or PostgREST."""
