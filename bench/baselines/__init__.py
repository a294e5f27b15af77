"""The naive designs offload is measured against (same routes and JSON shapes as the gateway)."""
