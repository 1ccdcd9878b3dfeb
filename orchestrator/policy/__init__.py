"""YAML policies: the schema-checked language, its compiler to Lua, and its validation."""
