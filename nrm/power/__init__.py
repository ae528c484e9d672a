"""Power: sensors, the node cap, and per-container power policies."""
