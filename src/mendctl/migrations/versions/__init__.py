"""Ledger schema revisions, oldest first by file name; Alembic loads them by path, so this
package exists only to make setuptools ship them."""
