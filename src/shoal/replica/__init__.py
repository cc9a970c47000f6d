"""The replica: one process running one copy of the user's class or function."""
