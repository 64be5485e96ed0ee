"""Kernels: lookup-table matrix-vector products on packed low-bit weights, and the layouts they stream."""
