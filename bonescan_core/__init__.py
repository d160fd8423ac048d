"""bonescan core: everything that is not UI. Never imports streamlit (a test enforces it)."""

__version__ = "0.1.0"
