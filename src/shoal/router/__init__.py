"""Routers live in every caller and send each request straight to a chosen replica."""
