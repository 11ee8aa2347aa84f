"""The domain of image-listener: pure decisions, models and the interfaces the daemon fills in."""
