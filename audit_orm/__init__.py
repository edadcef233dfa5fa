"""audit_orm: the execution audit trail of a trading system.

An append-only record of every step from a trading recommendation to its
market outcome, as an SQLAlchemy 2.x async ORM layer on PostgreSQL.
"""

from audit_orm.besteffort import BestEffortRepository
from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    AppendOnlyError,
    AuditError,
    AuditSerializationError,
    AuditSpoolError,
    AuditStorageError,
    AuditTimeoutError,
    AuditTransactionLostError,
    AuditUnavailableError,
    EventIdConflictError,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    MigrationConflictError,
    SealingError,
    UnknownEntityTypeError,
    UnknownEventTypeError,
    UnreadableRowError,
    WriterClosedError,
)
from audit_orm.export import export_events
from audit_orm.grants import grant
from audit_orm.models import AuditEvent, AuditSeal, Base
from audit_orm.payloads import PAYLOAD_MODELS, AuditPayload, validate_payload
from audit_orm.records import AuditPage, AuditRecord
from audit_orm.repository import AuditRepository, EventSpec
from audit_orm.retry import RetryPolicy
from audit_orm.sealing import (
    Digest,
    Progress,
    SealInfo,
    SealResult,
    SealStatus,
    digest,
    seal,
)
from audit_orm.spool import ReplayReport, Spool, SpooledRecord, replay_spool
from audit_orm.verifying import (
    Notice,
    NoticeKind,
    Problem,
    ProblemKind,
    VerifyReport,
    verify,
)
from audit_orm.writer import AuditWriter

__version__ = "0.2.0"

__all__ = [
    "PAYLOAD_MODELS",
    "AppendOnlyError",
    "AuditError",
    "AuditEvent",
    "AuditEventType",
    "AuditPage",
    "AuditPayload",
    "AuditRecord",
    "AuditRepository",
    "AuditSeal",
    "AuditSerializationError",
    "AuditSpoolError",
    "AuditStorageError",
    "AuditTimeoutError",
    "AuditTransactionLostError",
    "AuditUnavailableError",
    "AuditWriter",
    "Base",
    "BestEffortRepository",
    "Digest",
    "EntityType",
    "EventIdConflictError",
    "EventSpec",
    "InvalidIdError",
    "InvalidInputError",
    "InvalidPayloadError",
    "MigrationConflictError",
    "Notice",
    "NoticeKind",
    "Problem",
    "ProblemKind",
    "Progress",
    "ReplayReport",
    "RetryPolicy",
    "SealInfo",
    "SealResult",
    "SealStatus",
    "SealingError",
    "Spool",
    "SpooledRecord",
    "UnknownEntityTypeError",
    "UnknownEventTypeError",
    "UnreadableRowError",
    "VerifyReport",
    "WriterClosedError",
    "__version__",
    "digest",
    "export_events",
    "grant",
    "replay_spool",
    "seal",
    "validate_payload",
    "verify",
]
