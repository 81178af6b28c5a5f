"""Fault injection against the real daemon: kill -9, lost and stalled links, full buffers and
disks, damaged buffer files. See ``tests/faults/README.md``."""
