"""Benchmarks of audit_orm against the module it replaces and the driver's limits."""
