"""audit_orm: the execution audit trail of a trading system.

An append-only record of every step from a trading recommendation to its
market outcome, as an SQLAlchemy 2.x async ORM layer on PostgreSQL.
"""

from audit_orm.besteffort import BestEffortRepository
from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    AuditError,
    AuditSpoolError,
    AuditStorageError,
    AuditTimeoutError,
    AuditUnavailableError,
    EventIdConflictError,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    MigrationConflictError,
    UnknownEntityTypeError,
    UnknownEventTypeError,
)
from audit_orm.export import export_events
from audit_orm.models import AuditEvent, Base
from audit_orm.payloads import PAYLOAD_MODELS, AuditPayload, validate_payload
from audit_orm.records import AuditPage, AuditRecord
from audit_orm.repository import AuditRepository
from audit_orm.retry import RetryPolicy
from audit_orm.spool import ReplayReport, Spool, SpooledRecord, replay_spool

__version__ = "0.1.0"

__all__ = [
    "PAYLOAD_MODELS",
    "AuditError",
    "AuditEvent",
    "AuditEventType",
    "AuditPage",
    "AuditPayload",
    "AuditRecord",
    "AuditRepository",
    "AuditSpoolError",
    "AuditStorageError",
    "AuditTimeoutError",
    "AuditUnavailableError",
    "Base",
    "BestEffortRepository",
    "EntityType",
    "EventIdConflictError",
    "InvalidIdError",
    "InvalidInputError",
    "InvalidPayloadError",
    "MigrationConflictError",
    "ReplayReport",
    "RetryPolicy",
    "Spool",
    "SpooledRecord",
    "UnknownEntityTypeError",
    "UnknownEventTypeError",
    "__version__",
    "export_events",
    "replay_spool",
    "validate_payload",
]
