"""attnkit.ops.linear: the linear / recurrent family (reference forms and triton/ kernels)."""
