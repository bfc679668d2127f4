"""DataModules, one per dataset family."""
