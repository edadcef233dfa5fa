"""``python -m audit_orm`` runs the command line."""

import sys

from audit_orm.cli import main

sys.exit(main())
