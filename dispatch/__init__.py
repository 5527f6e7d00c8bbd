"""The dispatch stage: delivers executed actions from the outbox to downstream HTTP endpoints."""
