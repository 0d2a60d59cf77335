"""The database: models, engine, migrations and the repository."""
