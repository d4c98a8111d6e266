"""nested_lab: the package behind the Nested Lab book on stability in learning systems."""

__version__ = "0.1.0"
