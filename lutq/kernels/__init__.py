"""Kernels: lookup-table matrix-vector products on packed low-bit weights, and the layouts they stream.

Entry points (plain arrays in, preallocated outputs written; docs/KERNELS.md has the layouts and figures):
    lut.Tables / lut.gemv_bitserial                 int2, int3, int4, ternary       (layout.pack_bitserial)
    codebook.gemv_nf_bitserial (with lut.Tables)    nf2, nf3                        (layout.pack_bitserial)
    codebook.CodebookTables / codebook.gemv_nf4     nf4                             (layout.pack_codebook)
    fineq.ClusterTables / fineq.gemv_fineq          fineq                           (quantize/fineq.py's pack)
    vnni.Int8Activations / vnni.gemv_crumbs         int2/ternary on VNNI, dotprod   (layout.pack_crumbs)
"""
