"""The breaker controller: backlog sampling, breaker level decisions, deferred-sync replay, alerts."""
