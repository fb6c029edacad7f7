"""fedrnn shared."""
