"""Models: small, readable, one file each."""
