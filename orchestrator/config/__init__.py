"""What operators write: the service config, the catalog and tenants, context files."""
