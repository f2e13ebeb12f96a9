"""Teachers that write reasoning traces offline: programmatic worked solutions and rejection sampling from local models."""
