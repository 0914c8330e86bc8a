"""What a node tells about itself while it runs: its counters, node.stats, the Prometheus endpoint."""
