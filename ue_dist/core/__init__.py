"""Pure-torch building blocks: no Ray here (see DESIGN.md, layers)."""
