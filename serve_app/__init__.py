"""rankstream serve_app."""
