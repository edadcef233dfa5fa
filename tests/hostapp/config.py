"""The host's Alembic configuration, built in Python.

``alembic.ini`` next to this file serves the ``alembic`` command line from a
checkout; an application usually also builds its configuration in code (for its
own CLI or its start-up), which is what :func:`alembic_config` does, taking
audit_orm's revisions from wherever the package is installed.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from audit_orm import migrate

HERE = Path(__file__).resolve().parent
#: The host's own revisions.
HOST_VERSIONS = HERE / "migrations" / "versions"


def alembic_config(*, include_audit_orm: bool = True) -> Config:
    """The host's configuration; without ``include_audit_orm`` it sees only its own revisions.

    Locations are separated by newlines, so paths may contain spaces.
    """
    config = Config(str(HERE / "alembic.ini"))
    locations = [str(HOST_VERSIONS)]
    if include_audit_orm:
        locations.append(str(migrate.versions_location()))
    config.set_main_option("path_separator", "newline")
    config.set_main_option("version_locations", "\n".join(locations))
    return config
