"""Benchmarks of arkv_local's KV memory: scripts that print numbers, never timed tests."""
