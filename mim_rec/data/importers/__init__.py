"""Importers of public data sets into world folders (see ``docs/data.md``).

Each importer maps a source format onto the items/pairs/events contracts, refuses bad or
inconsistent sources with file/row/field, and says what the source lacks instead of
inventing it silently.
"""
