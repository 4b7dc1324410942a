"""Hydra configuration shipped with clbench (package data)."""
