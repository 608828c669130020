"""Where a tenant lives: directory, placement, two-level resolve cache, router service."""
