"""The aviato scheduler: one process on the control path (see DESIGN.md)."""
