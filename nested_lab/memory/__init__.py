"""Memories of the replicated systems: CortexGPT's short- and long-term memory,
its gates, sparse column selection and consolidation."""
