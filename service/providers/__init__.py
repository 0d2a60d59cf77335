"""The real local providers, one module per step, and the registry that maps steps to them."""
