"""Reproducible CPU training of the models the labelers ship (needs the ``train`` extra)."""
