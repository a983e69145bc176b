"""kiln's graph passes, one module per pass.

FX-level (the graph Dynamo captures, before splitting): ``noop_elimination``, ``split``.
Inductor post-grad (each piece, on ATen ops, through Inductor's pattern matcher): the fusion
passes, run by ``fusion.FusionPasses``.
"""
