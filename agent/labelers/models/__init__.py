"""Model files shipped with the labelers (a package so that wheels carry them as package data)."""
