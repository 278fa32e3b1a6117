"""Host glue for the WebUIs (A1111 v1.6-v1.10, Forge). Imports ``modules.*``/gradio; never imported by the core.

``script`` holds the one Script class and the host detection; ``a1111``/``forge`` are the host adapters; ``ui``,
``xyz`` and ``api`` build the accordion, the X/Y/Z plot axes and the read-only HTTP endpoints.
"""
