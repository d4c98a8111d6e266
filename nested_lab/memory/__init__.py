"""Memories of the replicated systems: CortexGPT's short- and long-term memory, its gates,
sparse column selection and consolidation; the delta rule and the Titans neural memory
(per-token references and chunked forms); capacity curves of associative memories;
the Continuum Memory System of Nested Learning, its trainers and a drifting-stream experiment."""
