"""Locust scenarios for load testers (see README)."""
