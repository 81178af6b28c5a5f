"""Sinks: where buffered events go (``kafka``)."""
