"""PostgreSQL's ``xid8`` type (a 64-bit transaction id) for SQLAlchemy.

Rows carry the id of the transaction that wrote them; the sealer compares it
with a snapshot's ``xmin``. SQLAlchemy's PostgreSQL dialect does not know the
type, so it is registered here for reflection too: Alembic's autogenerate then
compares it like any other column type.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import base as pg_base
from sqlalchemy.types import UserDefinedType


class XID8(UserDefinedType[int]):
    """A ``xid8`` column, read and written as a Python :class:`int`."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        """The DDL type name."""
        return "XID8"


pg_base.ischema_names.setdefault("xid8", XID8)
