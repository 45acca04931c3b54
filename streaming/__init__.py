"""rankstream streaming."""
