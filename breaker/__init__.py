"""The breaker controller: backlog sampling, stage decisions, deferred-sync replay."""
