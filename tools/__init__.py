"""Developer tools: the local stack (``stack.py``), the SMTP sink, the settings table."""
