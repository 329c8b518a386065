"""Running on a cluster: Ray pools, Kubernetes deployment files."""

KUBERNETES_OVERLAYS = ("dev", "confidential", "external-redis")
"""The overlays of deploy/kubernetes (kept here so the CLI names them without imports)."""
