"""The framed protocol that carries both control calls and requests between shoal processes."""
