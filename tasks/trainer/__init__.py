"""Trainer plumbing shared by every task kind: speed/memory callbacks, distributed strategies,
atomic checkpoint IO."""
