"""Data that needs no download: the standard library's own text, and synthetic streams."""
