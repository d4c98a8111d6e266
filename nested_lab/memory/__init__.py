"""Memories of the replicated systems, as pure update rules and small modules: CortexGPT's short-
and long-term memory, its gates, sparse column selection and consolidation; the delta rule and the
Titans neural memory (per-token references beside chunked forms); the seed's self-modifying rule;
the Continuum Memory System of Nested Learning. Experiments built on them live in
:mod:`nested_lab.experiments`."""
