"""fedrnn simulations."""
