"""The offline HTML report over a record's visual/ folder, its sections derived from the registry."""
