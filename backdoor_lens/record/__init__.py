"""The only code that knows BackdoorBench's format: safe loading, records, dataset readers, splits."""
