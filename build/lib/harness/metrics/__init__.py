"""Pure metric functions of (model, data): they return values and never print or write."""
