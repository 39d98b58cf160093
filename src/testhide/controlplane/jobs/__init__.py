"""Jobs: the domain model, validation, the scheduler and log handling."""
