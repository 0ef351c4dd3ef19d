"""Turning results into things people and CI read: terminal, Markdown, JSON, JUnit, HTML, HDR logs.

``render_report(format, results)`` is the one entry point; each format lives in its own module and is
imported only when asked for.
"""
