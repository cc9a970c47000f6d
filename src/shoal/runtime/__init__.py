"""Runtimes start, stop and place replica processes; nothing else differs between them."""
