"""The long-lived tilerun service: engine actor, task store, status page and metrics."""
