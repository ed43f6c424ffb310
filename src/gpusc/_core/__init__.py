"""Shared internals: array placement, AnnData access, the kernel loader, validation."""
