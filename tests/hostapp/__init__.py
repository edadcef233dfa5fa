"""A small host application that embeds audit_orm.

It has a table of its own (``orders``), its own declarative base with its own
naming convention, and its own Alembic environment whose ``version_locations``
include audit_orm's revisions: the layout the README's "Inside your
application's Alembic" section describes.
"""
