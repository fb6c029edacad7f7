"""fedrnn server."""
