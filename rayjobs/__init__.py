"""rankstream rayjobs."""
