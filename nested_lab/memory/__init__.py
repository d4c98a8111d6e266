"""Memories of the replicated systems: CortexGPT's short- and long-term memory, its gates,
sparse column selection and consolidation; the delta rule and the Titans neural memory
(per-token references and chunked forms); capacity curves of associative memories."""
