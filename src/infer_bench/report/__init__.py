"""Turning results into things people read: the terminal summary (and, later, markdown, HTML, JUnit)."""
