"""Event and entity types.

The values are the strings the original raw-asyncpg module wrote, so rows it
wrote and rows this package writes are the same data.
"""

from __future__ import annotations

from enum import StrEnum


class AuditEventType(StrEnum):
    """Every kind of step in the decision chain of an order."""

    RECOMMENDATION_GENERATED = "recommendation.generated"
    RECOMMENDATION_SUPPRESSED = "recommendation.suppressed"
    RISK_EVALUATED = "risk.evaluated"
    RISK_REJECTED = "risk.rejected"
    ORDER_SUBMITTED = "order.submitted"
    ORDER_ACCEPTED = "order.accepted"
    ORDER_FILLED = "order.filled"
    ORDER_REJECTED = "order.rejected"
    ORDER_CANCELLED = "order.cancelled"
    ORDER_DUPLICATE = "order.duplicate_prevented"
    POSITION_OPENED = "position.opened"
    POSITION_CLOSED = "position.closed"
    POSITION_UPDATED = "position.updated"
    TRADING_MODE_CHANGED = "trading.mode_changed"
    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_APPROVED = "approval.approved"
    APPROVAL_REJECTED = "approval.rejected"
    APPROVAL_EXPIRED = "approval.expired"


class EntityType(StrEnum):
    """The kind of thing an event is about."""

    RECOMMENDATION = "recommendation"
    RISK_EVALUATION = "risk_evaluation"
    ORDER = "order"
    POSITION = "position"
    APPROVAL = "approval"
    RISK_CONFIG = "risk_config"


#: Member by stored string: one dict lookup on hot paths (a row read, an event
#: validated) instead of the enum's own, slower, value lookup.
EVENT_TYPES_BY_VALUE: dict[str, AuditEventType] = {t.value: t for t in AuditEventType}
ENTITY_TYPES_BY_VALUE: dict[str, EntityType] = {t.value: t for t in EntityType}
