"""The pass library: importance criteria, allocation, rewrite."""
