"""The host's orders table.

Revision ID: h001_orders
Revises:
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "h001_orders"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("hostapp",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("ticker", sa.String(32), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("quantity", sa.Numeric(20, 8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.CheckConstraint("quantity > 0", name=op.f("orders_quantity_positive_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("orders_pk")),
    )
    op.create_index(op.f("orders_ticker_idx"), "orders", ["ticker"])


def downgrade() -> None:
    op.drop_index(op.f("orders_ticker_idx"), table_name="orders")
    op.drop_table("orders")
