"""Full-ranking evaluation, metrics, and trained runs loaded back from their workdir."""
