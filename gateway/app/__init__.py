"""The daemon: wiring, supervision, the ingest pipeline and the health endpoint."""
