"""rankstream cluster."""
