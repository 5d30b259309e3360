"""The engine every method and backend builds on.

- :mod:`.blocks`: the interfaces to model families (``Backend``, ``BlockView``).
- :mod:`.ops`: token-axis kernels (gather, scatter, top-k, class-token attention).
- :mod:`.merging`: bipartite soft matching for merging methods.
- :mod:`.pieces`: the reduced-token block pieces methods compose (attend, residuals, masks).
- :mod:`.state`: the per-pass state; :mod:`.records`: what a trace records.
- :mod:`.options`: strict option types; :mod:`.method`: the method base; :mod:`.registry`.
- :mod:`.runner`: installing the patched forwards and running passes through them.
"""
