"""The image-listener command line: one module per command family."""
