"""Prefix routing against round robin on two llama-server replicas."""
