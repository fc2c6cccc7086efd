"""Shared test support: start the gateway as a real process against a config written by the test."""
