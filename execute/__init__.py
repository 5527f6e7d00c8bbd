"""The execute stage: ready lanes by priority -> downstream actions, once each in effect."""
