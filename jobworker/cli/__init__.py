"""The jobworker command line."""
