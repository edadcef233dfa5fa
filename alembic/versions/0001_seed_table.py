"""The audit_events table as the original raw-asyncpg module wrote it.

A database that already has this table is adopted with
``alembic stamp 0001_seed_table`` followed by ``alembic upgrade head``.

Revision ID: 0001_seed_table
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_seed_table"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("audit_orm",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Exactly the columns of the original INSERT; everything else comes later.
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("entity_type", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Uuid(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False, server_default=sa.text("'system'")),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("id", name="audit_events_pkey"),
    )


def downgrade() -> None:
    op.drop_table("audit_events")
