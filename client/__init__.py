"""fedrnn client."""
