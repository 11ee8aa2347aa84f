"""Image generators: OpenAI, the offline placeholder, and the retry wrapper."""
