"""Deploying dynamic-workload."""
