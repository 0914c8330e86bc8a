"""Bulk links between ring members: authenticated by node keys, sealed with per-link AES-GCM keys."""
