"""Helpers shared by the test suite (throwaway PostgreSQL server, ...)."""
