"""Wake-up sources: hints that something may be claimable."""
