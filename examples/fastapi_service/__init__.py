"""A small FastAPI order service that records its audit trail with audit_orm."""
