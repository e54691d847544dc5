"""attnkit.ops: one folder per mechanism (reference forms beside their kernels)."""
