"""Covering trail indexes; BRIN summarized as rows arrive.

* ``ix_audit_events_order_id_seq`` gains ``INCLUDE (entity_id, recommendation_id)``
  and ``ix_audit_events_recommendation_id_seq`` gains ``INCLUDE (entity_id)``:
  the order trail collects its chain (the recommendation, every entity linked to
  the order or the recommendation) with index-only scans and reads the table
  only for the rows it returns.
* ``ix_audit_events_recorded_at`` (BRIN) gets ``autosummarize = on``, so time
  ranges over the newest rows do not scan unsummarized pages until a VACUUM.

Write cost: the same number of index entries per insert as before; the two
partial indexes grow by the included columns (about 30% and 12% at a million
rows, some 5% of all index space), which buys the index-only chain lookups.
No index is added: a search by event type or actor alone stays a walk of the
``seq`` index, as those are exports and audits, not trails (see ``stream``).

The indexes are rebuilt inside the migration's transaction, which blocks writes
to ``audit_events`` meanwhile; on a very large table create them beforehand
with ``CREATE INDEX CONCURRENTLY`` under temporary names, then drop the old
ones and rename.

Revision ID: 0004_trail_indexes
Revises: 0003_append_only_sealing
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_trail_indexes"
down_revision: str | Sequence[str] | None = "0003_append_only_sealing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _trail_indexes(covering: bool) -> None:
    op.drop_index("ix_audit_events_order_id_seq", table_name="audit_events")
    op.drop_index("ix_audit_events_recommendation_id_seq", table_name="audit_events")
    op.create_index(
        "ix_audit_events_order_id_seq",
        "audit_events",
        ["order_id", "seq"],
        postgresql_include=["entity_id", "recommendation_id"] if covering else [],
        postgresql_where=sa.text("order_id IS NOT NULL"),
    )
    op.create_index(
        "ix_audit_events_recommendation_id_seq",
        "audit_events",
        ["recommendation_id", "seq"],
        postgresql_include=["entity_id"] if covering else [],
        postgresql_where=sa.text("recommendation_id IS NOT NULL"),
    )


def upgrade() -> None:
    _trail_indexes(covering=True)
    op.execute("ALTER INDEX ix_audit_events_recorded_at SET (autosummarize = on)")


def downgrade() -> None:
    op.execute("ALTER INDEX ix_audit_events_recorded_at RESET (autosummarize)")
    _trail_indexes(covering=False)
