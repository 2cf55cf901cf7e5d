"""Jinja2 templates that the code generator renders into a spec's module."""
