"""Pure-torch building blocks: no Ray here (layers: docs/architecture.md)."""
