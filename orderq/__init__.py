"""orderq: an order-intake queue for peak sales, on Redis streams."""

__version__ = "0.1.0"
