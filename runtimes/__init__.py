"""Runners for exported models; they import neither torch nor the converter."""
