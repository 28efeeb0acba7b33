"""The config files: validated into frozen pydantic objects, with errors that name the field and line."""
