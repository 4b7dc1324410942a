"""Backbones; importing this package registers the built-ins."""
