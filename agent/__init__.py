"""The aviato agent: one daemon per host, running sandboxes and serving their data plane."""
