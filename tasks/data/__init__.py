"""Data plumbing the tasks share: tokenisation, the visual input and its collate, caption and annotation readers,
joins with the feature store."""
