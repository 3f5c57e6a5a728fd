"""The HTTP endpoints, one controller per file."""
