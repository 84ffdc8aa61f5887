"""Block-sparse attention over a BlockRoute."""
