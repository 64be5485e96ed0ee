"""Kernels: lookup-table matrix-vector products on packed low-bit weights, and the layouts they stream.

Entry points (plain arrays in, preallocated outputs written; docs/KERNELS.md has the layouts and figures):
    lut.Tables / lut.gemv_bitserial                 int2, int3, int4, ternary       (layout.pack_bitserial)
    codebook.CodebookTables / codebook.gemv_nf4     nf4, nf2                        (layout.pack_codebook, _pairs)
    codebook.PairTables / codebook.gemv_nf3         nf3                             (layout.pack_codebook3)
    fineq.ClusterTables / fineq.gemv_fineq          fineq                           (quantize/fineq.py's pack)
    vnni.Int8Activations / vnni.gemv_crumbs         int2/ternary on VNNI, dotprod   (layout.pack_crumbs)
"""
