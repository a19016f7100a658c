"""Models composed from runtime.layers."""
