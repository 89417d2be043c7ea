"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs in-process from `mendctl.ledger.Ledger`, on SQLite (batch mode, inside one IMMEDIATE
transaction with foreign keys off) and on PostgreSQL (one transaction holding an advisory
lock): write it with batch operations so it works on both. Keep the ORM models in
mendctl/ledger.py in step: tests/test_migrations.py and tests/test_postgres.py compare the two.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: Union[str, Sequence[str], None] = ${repr(down_revision)}
branch_labels: Union[str, Sequence[str], None] = ${repr(branch_labels)}
depends_on: Union[str, Sequence[str], None] = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
