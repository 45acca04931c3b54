"""The model zoo; ``registry.py`` builds any of them by name."""
