"""Real-browser end-to-end tests (a package so modules can ``from .conftest import`` the helpers)."""
