"""Attention within gathered token groups (TokenRoute)."""
