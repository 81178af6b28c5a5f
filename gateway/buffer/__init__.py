"""The durable store-and-forward buffer between the mapper and the forwarder."""
