"""Training loops and the measurements made on them."""
