"""Watching a cluster: one snapshot of every node and job, for ``dllmctl top`` and the dashboard."""
